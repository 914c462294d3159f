"""The plugin pool: several processes per plugin, restarts with backoff, start sharing, stop.

Real SDK plugins in real uv environments, built once for the module (see ``plugin_factory``);
every test starts its own pool and closes it. One process on its own is tested in
``test_runtime_process.py``, memory limits (enforced through the pool) in
``test_runtime_memory.py``.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from plugin_factory import Plugin, is_running, json_of, tool, with_environment, write_plugin

from plugind.errors import PlugindError
from plugind.runtime.pool import PluginPool
from plugind.runtime.process import PluginRequest


@pytest.fixture(scope="module")
def tester(tmp_path_factory: pytest.TempPathFactory) -> Plugin:
    folder = write_plugin(tmp_path_factory.mktemp("tester") / "tester")
    return with_environment(folder, "acme/tester:0.1.0@test")


@contextlib.asynccontextmanager
async def pool_of(**options: Any) -> AsyncIterator[PluginPool]:
    pool = PluginPool(**options)
    try:
        yield pool
    finally:
        await pool.aclose()


async def call(pool: PluginPool, plugin: Plugin, request: PluginRequest, **kw: Any) -> list[Any]:
    return await pool.invoke(
        plugin.identifier,
        plugin.workdir,
        plugin.python,
        plugin.entrypoint,
        request,
        timeout=kw.pop("timeout", 20),
        **kw,
    )


# ------------------------------------------------------------------ results and environment


@pytest.mark.anyio
async def test_results_over_the_cap_fail_only_their_session(tester: Plugin) -> None:
    async with pool_of(max_result_size=64 * 1024) as pool:
        for size in (200 * 1024, 3 * 1024 * 1024):  # summed chunks / one dropped huge line
            with pytest.raises(PlugindError) as caught:
                await call(pool, tester, tool("tester", "echo", text="x" * size))
            assert caught.value.code == "result_too_large"
        assert json_of(await call(pool, tester, tool("tester", "echo", n=2))) == [
            {"echo": {"n": 2}}
        ]
        assert pool.snapshot().restarts == 0


@pytest.mark.anyio
async def test_a_6_mib_message_is_one_chunk(tester: Plugin) -> None:
    text = "y" * (6 * 1024 * 1024)
    async with pool_of() as pool:
        chunks = await call(pool, tester, tool("tester", "echo", text=text))
    assert json_of(chunks) == [{"echo": {"text": text}}]


@pytest.mark.anyio
async def test_plugins_get_a_scrubbed_environment(
    tester: Plugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:secret@host/0")
    monkeypatch.setenv("PLUGIND_API_KEY", "secret")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    async with pool_of(base_env={"DIFY_INNER_API_URL": "http://dify"}) as pool:
        (result,) = json_of(await call(pool, tester, tool("tester", "env")))
    env = result["env"]
    assert "REDIS_URL" not in env and "PLUGIND_API_KEY" not in env
    assert env["INSTALL_METHOD"] == "local"
    assert env["DIFY_INNER_API_URL"] == "http://dify"
    assert env["LC_ALL"] == "C.UTF-8" and "PATH" in env


# ------------------------------------------------------------------ crashes, starts, growth, stop


@pytest.mark.anyio
async def test_crash_fails_every_in_flight_session_and_the_pool_restarts(tester: Plugin) -> None:
    async with pool_of() as pool:
        await pool.start(tester.identifier, tester.workdir, tester.python, tester.entrypoint)
        (first,) = pool.snapshot().plugins[0].processes
        errors: dict[str, PlugindError] = {}
        crash_chunks: list[Any] = []

        async def run(name: str, request: PluginRequest) -> None:
            async def on_chunk(chunk: Any) -> None:
                crash_chunks.append(chunk)

            with pytest.raises(PlugindError) as caught:
                await call(pool, tester, request, on_chunk=on_chunk if name == "crash" else None)
            errors[name] = caught.value

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "sleeper", tool("tester", "sleep", seconds=15))
            await anyio.sleep(0.2)
            tg.start_soon(run, "crash", tool("tester", "crash"))
        assert time.monotonic() - started < 5
        assert {e.code for e in errors.values()} == {"plugin_crashed"}
        assert "exited with status 3" in errors["sleeper"].message
        assert "crashy: calling os._exit(3)" in errors["crash"].message  # the stderr tail
        assert [c["message"]["text"] for c in crash_chunks] == ["about to crash"]

        chunks = await call(pool, tester, tool("tester", "echo", again=True))
        assert json_of(chunks) == [{"echo": {"again": True}}]
        stats = pool.snapshot().plugins[0]
        assert stats.restarts == 1
        (second,) = stats.processes
        assert second.pid != first.pid and second.alive
        assert not is_running(first.pid or 0)


@pytest.mark.anyio
async def test_a_failing_start_backs_off(tester: Plugin, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tester.workdir, broken, ignore=shutil.ignore_patterns(".venv"))
    (broken / "tools" / "echo.py").unlink()
    plugin = tester._replace(identifier="acme/broken:0.1.0@test", workdir=broken)
    async with pool_of(backoff_initial=2.0) as pool:
        with pytest.raises(PlugindError) as caught:
            await call(pool, plugin, tool("tester", "echo"))
        assert caught.value.code == "plugin_start_failed"
        assert "before it was ready" in caught.value.message
        assert "echo.py" in caught.value.message  # the traceback's tail from stderr
        started = time.monotonic()
        with pytest.raises(PlugindError) as caught:
            await call(pool, plugin, tool("tester", "echo"), timeout=0.5)
        assert time.monotonic() - started < 0.3  # no second start attempted inside the backoff
        assert "next start in" in caught.value.message
        assert pool.snapshot().plugins[0].consecutive_failures == 1


@pytest.mark.anyio
async def test_a_start_outlives_a_caller_whose_time_ran_out(tester: Plugin) -> None:
    async with pool_of() as pool:
        with pytest.raises(PlugindError) as caught:
            await call(pool, tester, tool("tester", "echo", n=1), timeout=0.05)
        assert caught.value.code == "timeout"
        assert "still starting" in caught.value.message
        (pending,) = pool.snapshot().plugins[0].processes
        assert pending.pid is not None and not pending.alive
        chunks = await call(pool, tester, tool("tester", "echo", n=2))
        assert json_of(chunks) == [{"echo": {"n": 2}}]
        (ready,) = pool.snapshot().plugins[0].processes
        assert ready.pid == pending.pid and ready.alive
        assert pool.snapshot().restarts == 0


@pytest.mark.anyio
async def test_busy_pool_grows_without_making_the_caller_wait(tester: Plugin) -> None:
    async with pool_of(instances=2) as pool:
        await pool.start(tester.identifier, tester.workdir, tester.python, tester.entrypoint)
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, pool, tester, tool("tester", "sleep", seconds=1.5))
            await anyio.sleep(0.1)
            started = time.monotonic()
            assert json_of(await call(pool, tester, tool("tester", "echo"))) == [{"echo": {}}]
            assert time.monotonic() - started < 0.5  # served by the busy process meanwhile
        with anyio.fail_after(15):
            while pool.snapshot().processes < 2:
                await anyio.sleep(0.1)
        assert pool.snapshot().restarts == 0


@pytest.mark.anyio
async def test_concurrent_callers_share_one_start(tester: Plugin) -> None:
    async with pool_of(instances=1) as pool:
        results: list[list[Any]] = []

        async def echo(n: int) -> None:
            results.append(json_of(await call(pool, tester, tool("tester", "echo", n=n))))

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(echo, n)
        assert sorted(r[0]["echo"]["n"] for r in results) == list(range(8))
        (stats,) = pool.snapshot().plugins
        assert len(stats.processes) == 1 and stats.restarts == 0


@pytest.mark.anyio
async def test_aclose_leaves_no_process_behind(tester: Plugin) -> None:
    async with pool_of(instances=2) as pool:
        await pool.start(tester.identifier, tester.workdir, tester.python, tester.entrypoint)
        async with anyio.create_task_group() as tg:  # all busy: the second caller adds a process
            for seconds in (0.8, 0.8):
                tg.start_soon(call, pool, tester, tool("tester", "sleep", seconds=seconds))
                await anyio.sleep(0.05)
        (spawned,) = json_of(await call(pool, tester, tool("tester", "spawn")))
        pids = [p.pid for p in pool.snapshot().plugins[0].processes]
        assert len(pids) == 2 and all(pid and is_running(pid) for pid in pids)
        child = spawned["child_pid"]
        assert is_running(child)
        await pool.aclose()
        assert pool.snapshot().processes == 0
    for pid in [*pids, child]:
        assert not is_running(pid or 0), pid
    with pytest.raises(PlugindError):
        await call(pool, tester, tool("tester", "echo"))


@pytest.mark.anyio
async def test_stop_ends_in_flight_sessions(tester: Plugin) -> None:
    async with pool_of() as pool:
        await pool.start(tester.identifier, tester.workdir, tester.python, tester.entrypoint)
        errors: list[PlugindError] = []

        async def sleeper() -> None:
            try:
                await call(pool, tester, tool("tester", "sleep", seconds=30))
            except PlugindError as exc:
                errors.append(exc)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(sleeper)
            await anyio.sleep(0.3)
            await pool.stop(tester.identifier)
        assert time.monotonic() - started < 5
        assert [e.code for e in errors] == ["plugin_crashed"]
        assert "was stopped" in errors[0].message
        assert pool.snapshot().plugins == ()


@pytest.mark.anyio
async def test_a_process_that_stops_sending_heartbeats_is_killed_and_replaced(
    tester: Plugin,
) -> None:
    """A frozen plugin (SIGSTOP here) sends no heartbeat: killed past the timeout, replaced."""
    import os
    import signal

    fast = {"HEARTBEAT_INTERVAL": "0.2"}  # the SDK's setting; it beats every 10 s by default
    async with pool_of(base_env=fast, heartbeat_timeout=1.5, memory_interval=0.1) as pool:
        await pool.start(tester.identifier, tester.workdir, tester.python, tester.entrypoint)
        (first,) = pool.snapshot().plugins[0].processes
        assert first.pid is not None
        await anyio.sleep(2.0)  # heartbeats keep a healthy process alive
        assert pool.snapshot().plugins[0].processes[0].alive
        os.kill(first.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        with anyio.fail_after(10):  # killed, and the pool has seen it go
            while is_running(first.pid) or pool.snapshot().plugins[0].processes[0].alive:
                await anyio.sleep(0.05)
        assert 1.2 < time.monotonic() - stopped < 4
        chunks = await call(pool, tester, tool("tester", "echo", back=True))
        assert json_of(chunks) == [{"echo": {"back": True}}]
        (second,) = pool.snapshot().plugins[0].processes
        assert second.alive and second.pid != first.pid
