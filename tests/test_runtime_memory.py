"""Memory limits: real SDK plugins going over theirs, and the numbers the pool reports."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import psutil  # type: ignore[import-untyped]
import pytest
from plugin_factory import ECHO, HOG, SLEEP, Plugin, write_plugin

from plugind.errors import PlugindError
from plugind.runtime.environment import ensure_environment
from plugind.runtime.interpreter import find_plugin_python
from plugind.runtime.memory import MIB, group_rss, manifest_memory, memory_limit
from plugind.runtime.pool import PluginPool
from plugind.runtime.process import PluginRequest

LIMIT = 200 * MIB


@pytest.fixture(scope="module")
def hog(tmp_path_factory: pytest.TempPathFactory) -> Plugin:
    try:
        python = find_plugin_python(os.environ.get("PLUGIN_PYTHON"))
    except PlugindError as exc:
        pytest.skip(f"no interpreter for plugins: {exc.message}")
    tools = {"echo": ECHO, "sleep": SLEEP, "hog": HOG}
    folder = write_plugin(tmp_path_factory.mktemp("hog") / "hog", name="hog", tools=tools)
    set_memory(folder, LIMIT)
    venv_python = anyio.run(functools.partial(ensure_environment, folder, python, timeout=300))
    return Plugin("acme/hog:0.1.0@test", folder, venv_python)


def set_memory(folder: Path, memory: int | None) -> None:
    manifest = folder / "manifest.yaml"
    line = f"  memory: {memory}\n" if memory is not None else "  cpu: 1\n"
    manifest.write_text(manifest.read_text().replace("  memory: 268435456\n", line))


def tool(name: str, **params: Any) -> PluginRequest:
    payload = {"provider": "hog", "tool": name, "tool_parameters": params, "credentials": {}}
    return PluginRequest("tool", "invoke_tool", payload, user_id="u1")


@contextlib.asynccontextmanager
async def pool_of(**options: Any) -> AsyncIterator[PluginPool]:
    pool = PluginPool(**options)
    try:
        yield pool
    finally:
        await pool.aclose()


async def call(pool: PluginPool, plugin: Plugin, request: PluginRequest) -> list[Any]:
    return await pool.invoke(*plugin, request, timeout=20)


def json_of(chunks: list[Any]) -> list[Any]:
    return [c["message"]["json_object"] for c in chunks if c["type"] == "json"]


# ------------------------------------------------------------------ the limit of a plugin


def test_the_limit_is_the_manifests_capped_by_the_pools(tmp_path: Path) -> None:
    asks = write_plugin(tmp_path / "asks", tools={})
    set_memory(asks, LIMIT)
    assert manifest_memory(asks) == LIMIT
    assert memory_limit("acme/asks", asks, None) is None  # limits are opt-in
    assert memory_limit("acme/asks", asks, 1024 * MIB) == LIMIT
    assert memory_limit("acme/asks", asks, 100 * MIB) == 100 * MIB  # the cap

    silent = write_plugin(tmp_path / "silent", tools={})
    set_memory(silent, None)
    assert manifest_memory(silent) is None
    assert memory_limit("acme/silent", silent, 300 * MIB) == 300 * MIB  # the default
    assert memory_limit("acme/silent", silent, None) is None
    assert memory_limit("acme/gone", tmp_path / "gone", None) is None


def test_group_rss_counts_the_children_of_the_group() -> None:
    hold = "import time; hog = b'x' * (64 << 20); print('ok', flush=True); time.sleep(30)"
    spawn = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {hold!r}])"
    leader = subprocess.Popen(
        [sys.executable, "-c", spawn + "; time.sleep(30)"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert leader.stdout is not None and leader.stdout.readline() == b"ok\n"
        totals = group_rss([leader.pid, 999_999_999])
        assert totals[leader.pid] >= 64 * MIB
        assert psutil.Process(leader.pid).memory_info().rss < 64 * MIB  # the child's, then
        assert totals[999_999_999] == 0
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(10)
        assert leader.stdout is not None
        leader.stdout.close()


# ------------------------------------------------------------------ enforcement


@pytest.mark.anyio
async def test_a_process_over_its_limit_is_killed_and_replaced(
    hog: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    async with pool_of(memory_limit=1024 * MIB) as pool:
        await pool.start(hog.identifier, hog.workdir, hog.python, hog.entrypoint)
        (first,) = pool.snapshot().plugins[0].processes
        errors: dict[str, PlugindError] = {}

        async def run(name: str, request: PluginRequest) -> None:
            with pytest.raises(PlugindError) as caught:
                await call(pool, hog, request)
            errors[name] = caught.value

        started = time.monotonic()
        with caplog.at_level(logging.WARNING, "plugind.runtime"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "sleeper", tool("sleep", seconds=15))
                tg.start_soon(run, "hog", tool("hog", mib=400))
        assert time.monotonic() - started < 5
        for error in errors.values():
            assert error.code == "plugin_crashed"
            assert "over its memory limit of 200 MiB" in error.message
            assert f"(pid {first.pid}) was killed (RSS " in error.message
        (warning,) = [r for r in caplog.records if r.getMessage().startswith("Killing")]
        assert warning.levelno == logging.WARNING
        assert f"acme/hog:0.1.0@test pid={first.pid}: RSS " in warning.getMessage()
        assert "over its memory limit of 200 MiB" in warning.getMessage()

        assert json_of(await call(pool, hog, tool("echo", again=True))) == [
            {"echo": {"again": True}}
        ]
        stats = pool.snapshot().plugins[0]
        assert stats.restarts == 1
        (second,) = stats.processes
        assert second.pid != first.pid and second.alive


@pytest.mark.anyio
async def test_what_the_plugin_spawns_counts_too(hog: Plugin) -> None:
    async with pool_of(memory_limit=1024 * MIB) as pool:
        started = time.monotonic()
        with pytest.raises(PlugindError) as caught:
            await call(pool, hog, tool("hog", mib=300, in_child=True))
        assert time.monotonic() - started < 8
        assert caught.value.code == "plugin_crashed"
        assert "over its memory limit of 200 MiB" in caught.value.message


@pytest.mark.anyio
async def test_a_process_under_its_limit_runs_and_reports_its_rss(hog: Plugin) -> None:
    async with pool_of(memory_limit=1024 * MIB, memory_interval=0.2) as pool:
        chunks = await call(pool, hog, tool("hog", mib=20, seconds=0.5))
        assert json_of(chunks) == [{"held_mib": 20}]
        (process,) = pool.snapshot().plugins[0].processes
        assert process.memory_limit == LIMIT  # the manifest's, under the pool's cap
        assert process.rss is not None and 0 < process.rss < LIMIT
        assert process.alive and pool.snapshot().restarts == 0
    assert not any(t.name == "plugind-memory" for t in threading.enumerate())


@pytest.mark.anyio
async def test_the_pools_cap_applies_to_the_manifests_limit(hog: Plugin) -> None:
    async with pool_of(memory_limit=150 * MIB) as pool:
        await pool.start(hog.identifier, hog.workdir, hog.python, hog.entrypoint)
        (process,) = pool.snapshot().plugins[0].processes
        assert process.memory_limit == 150 * MIB
