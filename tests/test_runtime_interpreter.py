"""Finding a Python >= 3.12 for plugin environments, shims and old versions excluded."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugind.errors import PlugindError
from plugind.runtime import interpreter
from plugind.runtime.interpreter import find_plugin_python, probe_version


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    interpreter.clear_cache()
    yield
    interpreter.clear_cache()


def shim(path: Path) -> Path:
    """A pyenv-like shim whose version is not installed: it exits 127."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho 'pyenv: python3.12: command not found' >&2\nexit 127\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def bare_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH, HOME and PYENV_ROOT pointing at empty folders of this test."""
    for name in ("bin", "home", "pyenv"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "pyenv"))
    monkeypatch.delenv("UV_PYTHON_INSTALL_DIR", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def real_python() -> Path:
    try:
        return find_plugin_python(None)
    except PlugindError:
        pytest.skip("no Python >= 3.12 on this machine")


def test_shims_that_exit_127_do_not_count(bare_machine: Path) -> None:
    shim(bare_machine / "bin" / "python3.12")
    shim(bare_machine / "pyenv" / "versions" / "3.13.1" / "bin" / "python3.13")
    assert probe_version(bare_machine / "bin" / "python3.12") is None
    with pytest.raises(PlugindError) as caught:
        find_plugin_python(None)
    assert caught.value.code == "plugin_start_failed"
    assert "no Python >= 3.12 found" in caught.value.message
    assert "PLUGIN_PYTHON" in caught.value.message


def test_discovery_picks_the_newest_that_runs(bare_machine: Path, real_python: Path) -> None:
    interpreter.clear_cache()
    version = probe_version(real_python)
    assert version is not None and version >= (3, 12)
    minor = version[1]
    working = bare_machine / "pyenv" / "versions" / f"3.{minor}.0" / "bin" / f"python3.{minor}"
    working.parent.mkdir(parents=True)
    working.symlink_to(real_python)
    shim(bare_machine / "pyenv" / "versions" / f"3.{minor + 1}.0" / "bin" / f"python3.{minor + 1}")
    old = bare_machine / "bin" / "python3"
    old.symlink_to(sys.executable)  # the daemon's own 3.11: too old
    assert find_plugin_python(None) == working
    # cached: the folder may go away without a new search
    working.unlink()
    assert find_plugin_python(None) == working


def test_explicit_interpreter_must_exist_run_and_be_new_enough(
    tmp_path: Path, real_python: Path
) -> None:
    with pytest.raises(PlugindError, match="does not exist"):
        find_plugin_python(str(tmp_path / "nope" / "python3.12"))
    with pytest.raises(PlugindError, match="does not run"):
        find_plugin_python(str(shim(tmp_path / "python3.12")))
    if sys.version_info < (3, 12):
        with pytest.raises(PlugindError, match=r"needs Python >= 3\.12"):
            find_plugin_python(sys.executable)
    assert find_plugin_python(str(real_python)) == real_python
