"""Requests to a plugin process are written together, whole, and in order.

``PluginProcess`` queues request lines and writes whatever was queued in one turn of the event
loop with one ``write`` (waiting for room when the pipe is full); these tests count the writes,
fill the pipe, cancel callers half-way and break the pipe.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from plugin_factory import Plugin, json_of, tool, with_environment, write_plugin

from plugind.errors import PlugindError
from plugind.runtime.process import PluginProcess

pytestmark = pytest.mark.anyio
BIG = 1 << 20


@pytest.fixture(scope="module")
def tester(tmp_path_factory: pytest.TempPathFactory) -> Plugin:
    folder = write_plugin(tmp_path_factory.mktemp("tester") / "tester")
    return with_environment(folder, "acme/tester:0.1.0@test")


@contextlib.asynccontextmanager
async def running(plugin: Plugin) -> AsyncIterator[PluginProcess]:
    process = PluginProcess(plugin.identifier, plugin.workdir, plugin.python, plugin.entrypoint)
    await process.start(ready_timeout=30)
    try:
        yield process
    finally:
        await process.aclose()


class Writes:
    """Counts the writes to a plugin's stdin (and can make them fail)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, process: PluginProcess) -> None:
        self.calls = 0
        self.fail: OSError | None = None
        real = os.write
        assert process._popen is not None and process._popen.stdin is not None
        stdin = process._popen.stdin.fileno()

        def write(fd: int, data: Any) -> int:
            if fd == stdin:
                self.calls += 1
                if self.fail is not None:
                    raise self.fail
            return real(fd, data)

        monkeypatch.setattr(os, "write", write)


async def test_requests_queued_together_leave_in_one_write(
    tester: Plugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tester) as process:
        writes = Writes(monkeypatch, process)
        answers: dict[int, Any] = {}

        async def echo(n: int) -> None:
            chunks = await process.invoke(
                tool("tester", "echo", n=n), timeout=10, max_result_size=BIG
            )
            answers[n] = json_of(chunks)

        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(echo, n)
    assert answers == {n: [{"echo": {"n": n}}] for n in range(50)}
    assert writes.calls == 1


async def test_a_full_pipe_delays_lines_without_cutting_or_reordering_them(
    tester: Plugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines far beyond the pipe's buffer, some of whose callers give up half-way."""
    big = "x" * 300_000
    async with running(tester) as process:
        pid = process.pid
        writes = Writes(monkeypatch, process)
        answers: dict[int, Any] = {}

        async def echo(n: int, cancel: bool) -> None:
            with anyio.move_on_after(0.0005 if cancel else 30):
                chunks = await process.invoke(
                    tool("tester", "echo", n=n, big=big), timeout=30, max_result_size=BIG
                )
                answers[n] = json_of(chunks)[0]["echo"]["n"]

        async with anyio.create_task_group() as tg:
            for n in range(12):
                tg.start_soon(echo, n, n % 3 == 1)
        # every caller that waited got its own answer; the process was never killed for a
        # half-written line, and is still usable
        assert answers == {n: n for n in range(12) if n % 3 != 1}
        assert writes.calls > 1  # the pipe filled up: the rest waited for room
        chunks = await process.invoke(tool("tester", "echo", n=99), timeout=10, max_result_size=BIG)
        assert json_of(chunks) == [{"echo": {"n": 99}}]
        assert process.alive and process.pid == pid


async def test_a_broken_stdin_fails_the_waiting_sessions_and_later_requests(
    tester: Plugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tester) as process:
        writes = Writes(monkeypatch, process)
        writes.fail = OSError(errno.EPIPE, "Broken pipe")
        errors: list[PlugindError] = []

        async def echo(n: int) -> None:
            try:
                await process.invoke(tool("tester", "echo", n=n), timeout=10, max_result_size=BIG)
            except PlugindError as exc:
                errors.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for n in range(3):
                    tg.start_soon(echo, n)
        assert [e.code for e in errors] == ["plugin_crashed"] * 3
        assert all("stopped reading requests" in e.message for e in errors)
        with pytest.raises(PlugindError, match="stopped reading requests"):
            await process.invoke(tool("tester", "echo", n=3), timeout=10, max_result_size=BIG)
        assert process.in_flight == 0
