"""Plugin processes, one at a time, with real SDK plugins in real uv environments.

The environments are built once per module (about a second each with a warm uv cache; the
first run downloads the SDK from PyPI). Every test starts its own processes and stops them.
The pool that runs several of them is tested in ``test_runtime_pool.py``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from plugin_factory import Plugin, json_of, tool, with_environment, write_plugin

from plugind.errors import PlugindError, TimedOut
from plugind.runtime.backwards import BackwardsCall, BackwardsReply
from plugind.runtime.interpreter import find_plugin_python
from plugind.runtime.process import PluginProcess

CALC = Path(__file__).resolve().parent.parent / "examples" / "plugins" / "calc"


@pytest.fixture(scope="module")
def calc(tmp_path_factory: pytest.TempPathFactory) -> Plugin:
    folder = tmp_path_factory.mktemp("calc") / "calc"
    shutil.copytree(CALC, folder, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    return with_environment(folder, "acme/calc:0.1.0@test")


@pytest.fixture(scope="module")
def tester(tmp_path_factory: pytest.TempPathFactory) -> Plugin:
    folder = write_plugin(tmp_path_factory.mktemp("tester") / "tester")
    return with_environment(folder, "acme/tester:0.1.0@test")


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
async def test_backwards_invocations_are_refused_not_left_hanging(tester: Plugin) -> None:
    async with running(tester) as process:
        started = time.monotonic()
        with pytest.raises(PlugindError) as caught:
            await process.invoke(tool("tester", "backwards"), timeout=10, max_result_size=1 << 20)
        assert time.monotonic() - started < 3
        assert caught.value.code == "plugin_error"
        assert "cannot relay backwards invocations (storage)" in caught.value.message


@pytest.mark.anyio
async def test_backwards_invocations_go_to_the_sessions_handler(tester: Plugin) -> None:
    calls: list[BackwardsCall] = []

    async def answer(call: BackwardsCall, reply: BackwardsReply) -> None:
        calls.append(call)
        await reply.respond({"data": b"from the handler".hex()})

    async def broken(call: BackwardsCall, reply: BackwardsReply) -> None:
        raise RuntimeError("the relay broke")

    async with running(tester) as process:
        chunks = await process.invoke(
            tool("tester", "backwards"), timeout=10, max_result_size=1 << 20, backwards=answer
        )
        assert [c["message"]["text"] for c in chunks] == ["from the handler"]
        [call] = calls
        assert (call.kind, call.request) == ("storage", {"opt": "get", "key": "answer"})
        started = time.monotonic()
        with pytest.raises(PlugindError) as caught:
            await process.invoke(
                tool("tester", "backwards"), timeout=10, max_result_size=1 << 20, backwards=broken
            )
        assert time.monotonic() - started < 3  # answered at once, not after the SDK's wait
        assert "the relay broke" in caught.value.message


@pytest.mark.anyio
async def test_a_call_in_flight_when_its_session_times_out_is_cancelled(tester: Plugin) -> None:
    cancelled = anyio.Event()

    async def hang(call: BackwardsCall, reply: BackwardsReply) -> None:
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    async with running(tester) as process:
        with pytest.raises(TimedOut):
            await process.invoke(
                tool("tester", "backwards"), timeout=1, max_result_size=1 << 20, backwards=hang
            )
        assert cancelled.is_set()
        chunks = await process.invoke(
            tool("tester", "echo", x=1), timeout=5, max_result_size=1 << 20
        )
        assert json_of(chunks) == [{"echo": {"x": 1}}]


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
