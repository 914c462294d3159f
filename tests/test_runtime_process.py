"""Plugin processes and the pool, with real SDK plugins in real uv environments.

The environments are built once per module (about a second each with a warm uv cache; the
first run downloads the SDK from PyPI). Every test starts its own processes and stops them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from plugin_factory import Plugin, is_running, write_plugin

from plugind.errors import PlugindError
from plugind.runtime.environment import ensure_environment
from plugind.runtime.interpreter import find_plugin_python
from plugind.runtime.pool import PluginPool
from plugind.runtime.process import PluginProcess, PluginRequest

CALC = Path(__file__).resolve().parent.parent / "examples" / "plugins" / "calc"


@pytest.fixture(scope="module")
def plugin_python() -> Path:
    try:
        return find_plugin_python(os.environ.get("PLUGIN_PYTHON"))
    except PlugindError as exc:
        pytest.skip(f"no interpreter for plugins: {exc.message}")


def _with_env(folder: Path, python: Path, identifier: str) -> Plugin:
    venv_python = anyio.run(functools.partial(ensure_environment, folder, python, timeout=300))
    return Plugin(identifier, folder, venv_python)


@pytest.fixture(scope="module")
def calc(tmp_path_factory: pytest.TempPathFactory, plugin_python: Path) -> Plugin:
    folder = tmp_path_factory.mktemp("calc") / "calc"
    shutil.copytree(CALC, folder, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    return _with_env(folder, plugin_python, "acme/calc:0.1.0@test")


@pytest.fixture(scope="module")
def tester(tmp_path_factory: pytest.TempPathFactory, plugin_python: Path) -> Plugin:
    folder = write_plugin(tmp_path_factory.mktemp("tester") / "tester")
    return _with_env(folder, plugin_python, "acme/tester:0.1.0@test")


def tool(provider: str, name: str, **params: Any) -> PluginRequest:
    payload = {"provider": provider, "tool": name, "tool_parameters": params, "credentials": {}}
    return PluginRequest("tool", "invoke_tool", payload, user_id="u1")


@contextlib.asynccontextmanager
async def running(plugin: Plugin, **options: Any) -> AsyncIterator[PluginProcess]:
    process = PluginProcess(
        plugin.identifier, plugin.workdir, plugin.python, plugin.entrypoint, **options
    )
    await process.start(ready_timeout=30)
    try:
        yield process
    finally:
        await process.aclose()


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


def json_of(chunks: list[Any]) -> list[Any]:
    return [c["message"]["json_object"] for c in chunks if c["type"] == "json"]


# ------------------------------------------------------------------ one process


@pytest.mark.anyio
async def test_calc_add_streams_chunks_in_order(
    calc: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plugind.plugin")
    seen: list[Any] = []

    async def on_chunk(chunk: Any) -> None:
        seen.append(chunk)

    async with running(calc) as process:
        assert process.alive and process.pid is not None
        assert process.declaration is not None and process.declaration["name"] == "calc"
        chunks = await process.invoke(
            tool("calc", "add", a=2, b=3), timeout=10, on_chunk=on_chunk, max_result_size=1 << 20
        )
        assert process.in_flight == 0
    assert chunks == [
        {"type": "json", "message": {"json_object": {"sum": 5}}, "meta": None},
        {"type": "text", "message": {"text": "5"}, "meta": None},
    ]
    assert seen == chunks
    assert any(
        r.name == "plugind.plugin"
        and "acme/calc" in r.getMessage()
        and "Installed tool" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.anyio
async def test_divide_by_zero_is_a_plugin_error(calc: Plugin) -> None:
    async with running(calc) as process:
        with pytest.raises(PlugindError) as caught:
            await process.invoke(
                tool("calc", "divide", a=2, b=0), timeout=10, max_result_size=1 << 20
            )
        assert caught.value.code == "plugin_error"
        assert caught.value.message == "cannot divide 2 by zero"
        assert caught.value.error_type == "ZeroDivisionError"
        assert "Traceback" in caught.value.error_args["traceback"]
        # the process is fine afterwards
        chunks = await process.invoke(
            tool("calc", "divide", a=6, b=3), timeout=10, max_result_size=1 << 20
        )
        assert json_of(chunks) == [{"quotient": 2.0}]


@pytest.mark.anyio
async def test_timeout_abandons_only_that_session(tester: Plugin) -> None:
    async with running(tester) as process:
        pid = process.pid
        started = time.monotonic()
        with pytest.raises(PlugindError) as caught:
            await process.invoke(
                tool("tester", "sleep", seconds=1.0), timeout=0.3, max_result_size=1 << 20
            )
        assert caught.value.code == "timeout"
        assert time.monotonic() - started < 0.9
        assert process.in_flight == 0
        # The late answer of the abandoned session arrives while others run, and is ignored.
        for _ in range(6):
            chunks = await process.invoke(
                tool("tester", "echo", n=1), timeout=5, max_result_size=1 << 20
            )
            assert json_of(chunks) == [{"echo": {"n": 1}}]
            await anyio.sleep(0.2)
        assert process.alive and process.pid == pid


@pytest.mark.anyio
async def test_concurrent_sessions_finish_out_of_order(tester: Plugin) -> None:
    finished: list[float] = []
    async with running(tester) as process:

        async def sleep(seconds: float) -> None:
            chunks = await process.invoke(
                tool("tester", "sleep", seconds=seconds), timeout=10, max_result_size=1 << 20
            )
            assert json_of(chunks) == [{"slept": seconds}]
            finished.append(seconds)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(sleep, 1.2)
            await anyio.sleep(0.1)
            tg.start_soon(sleep, 0.3)
            tg.start_soon(sleep, 0.1)
        assert time.monotonic() - started < 2.5  # they overlapped
    assert finished == [0.1, 0.3, 1.2]


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


@pytest.mark.anyio
async def test_backwards_invocations_are_refused_not_left_hanging(tester: Plugin) -> None:
    async with running(tester) as process:
        started = time.monotonic()
        with pytest.raises(PlugindError) as caught:
            await process.invoke(tool("tester", "backwards"), timeout=10, max_result_size=1 << 20)
        assert time.monotonic() - started < 3
        assert caught.value.code == "plugin_error"
        assert "cannot relay backwards invocations (storage)" in caught.value.message


# ------------------------------------------------------------------ crashes and the pool


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


# ------------------------------------------------------------------ interpreters


def test_missing_interpreter_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PlugindError) as caught:
        find_plugin_python(str(tmp_path / "no-such-python"))
    assert caught.value.code == "plugin_start_failed"
    assert "does not exist" in caught.value.message


@pytest.mark.anyio
async def test_a_process_without_its_interpreter_does_not_start(
    calc: Plugin, tmp_path: Path
) -> None:
    process = PluginProcess(calc.identifier, calc.workdir, tmp_path / "gone" / "python", "main")
    with pytest.raises(PlugindError) as caught:
        await process.start(ready_timeout=5)
    assert caught.value.code == "plugin_start_failed"
    assert "does not exist" in caught.value.message
