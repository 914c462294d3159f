"""Plugin environments built with uv: once, idempotently, with uv's own words on failure."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import anyio
import pytest

from plugind.errors import PlugindError
from plugind.runtime.environment import MARKER, ensure_environment
from plugind.runtime.interpreter import find_plugin_python

pytestmark = pytest.mark.anyio

CALC = Path(__file__).resolve().parent.parent / "examples" / "plugins" / "calc"


@pytest.fixture(scope="module")
def plugin_python() -> Path:
    try:
        return find_plugin_python(os.environ.get("PLUGIN_PYTHON"))
    except PlugindError as exc:
        pytest.skip(f"no interpreter for plugins: {exc.message}")


@pytest.fixture
def calc_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "calc"
    shutil.copytree(CALC, folder, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    return folder


async def test_built_once_then_reused_and_rebuilt_when_half_done(
    calc_copy: Path, plugin_python: Path
) -> None:
    progress: list[str] = []

    async def on_progress(message: str) -> None:
        progress.append(message)

    python = await ensure_environment(calc_copy, plugin_python, on_progress=on_progress)
    assert python == calc_copy / ".venv" / "bin" / "python"
    assert any(m.startswith("Installed ") for m in progress), progress
    assert progress[-1].startswith("environment ready")
    check = await anyio.run_process(
        [python, "-c", "import dify_plugin, sys; print(sys.version_info >= (3, 12))"]
    )
    assert check.stdout.strip() == b"True"

    sentinel = calc_copy / ".venv" / "sentinel"
    sentinel.touch()
    started = time.monotonic()
    assert await ensure_environment(calc_copy, plugin_python) == python
    assert time.monotonic() - started < 0.2 and sentinel.exists()  # reused, untouched

    (calc_copy / ".venv" / MARKER).unlink()  # as if the last build died halfway
    assert await ensure_environment(calc_copy, plugin_python) == python
    assert not sentinel.exists() and (calc_copy / ".venv" / MARKER).exists()


async def test_concurrent_builds_of_one_folder_build_once(
    calc_copy: Path, plugin_python: Path
) -> None:
    created: list[str] = []

    async def on_progress(message: str) -> None:
        if message.startswith("creating"):
            created.append(message)

    results: list[Path] = []

    async def build() -> None:
        results.append(await ensure_environment(calc_copy, plugin_python, on_progress=on_progress))

    async with anyio.create_task_group() as tg:
        tg.start_soon(build)
        tg.start_soon(build)
    assert len(results) == 2 and results[0] == results[1]
    assert len(created) == 1


async def test_failure_carries_uvs_explanation(calc_copy: Path, plugin_python: Path) -> None:
    (calc_copy / "requirements.txt").write_text("plugind-no-such-package-xyz==1.0\n")
    with pytest.raises(PlugindError) as caught:
        await ensure_environment(calc_copy, plugin_python, offline=True)
    assert caught.value.code == "dependency_install_failed"
    assert "uv pip install failed" in caught.value.message
    assert "plugind-no-such-package-xyz" in caught.value.message
    assert not (calc_copy / ".venv" / MARKER).exists()


async def test_missing_requirements_and_timeouts_are_clear(
    calc_copy: Path, plugin_python: Path
) -> None:
    (calc_copy / "requirements.txt").unlink()
    with pytest.raises(PlugindError) as caught:
        await ensure_environment(calc_copy, plugin_python)
    assert caught.value.code == "dependency_install_failed"
    assert "requirements.txt" in caught.value.message
    (calc_copy / "requirements.txt").write_text("dify-plugin==0.10.2\n")
    with pytest.raises(PlugindError) as caught:
        await ensure_environment(calc_copy, plugin_python, timeout=0.01)
    assert caught.value.code == "dependency_install_failed"
    assert "longer than" in caught.value.message
