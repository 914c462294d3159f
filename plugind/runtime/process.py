"""One long-lived plugin process, with many sessions multiplexed over its stdio.

The process is ``<venv>/bin/python -m <entrypoint>`` in the extracted package, in its own
process group (so stopping it also stops anything it spawned), with a scrubbed environment.

Its output is read by one thread per process, not by an event-loop task. The reader must run
as long as the process lives, whoever happens to be waiting: heartbeats, plugin logs and stderr
keep coming when no request is in flight, and a process that dies idle must be noticed. A
thread ties that lifetime to the OS process itself (it ends at EOF, which we guarantee by
stopping the process in :meth:`PluginProcess.aclose`) instead of to a task group some caller
has to own, and it parses multi-megabyte JSON lines off the event loop. It hands each batch of
parsed messages to the loop with ``anyio.from_thread.run_sync``, so every piece of session
state is touched on the loop only.

Requests are written from the loop, non-blocking, and together: a request line joins a buffer,
and the buffer leaves in one ``write`` once the requests queued in the same turn of the event
loop are in it (and, when the pipe is full, as soon as it has room again). Under load that is one
system call for many requests here, and one read, one thread hand-off for many in the plugin,
whose SDK reads its stdin through a thread pool. Lines are written whole and in order by the
writer alone, so a cancelled caller can never cut one in half.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from plugind.errors import PlugindError, TimedOut
from plugind.messages import new_event_id
from plugind.runtime import protocol
from plugind.runtime._calls import serve_call
from plugind.runtime._env import plugin_env
from plugind.runtime._reader import OutputReader, describe_exit, signal_group, warn_if_pid1
from plugind.runtime._sessions import SessionTable
from plugind.runtime.backwards import Backwards
from plugind.runtime.protocol import PluginRequest

__all__ = ["ChunkCallback", "PluginProcess", "PluginRequest"]

log = logging.getLogger(__name__)

ChunkCallback = Callable[[Any], Awaitable[None]]

DEFAULT_MAX_LINE = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Exit:
    returncode: int | None  # None: it could not be reaped


class PluginProcess:
    """A plugin process speaking Dify's stdio protocol; see the module docstring."""

    def __init__(
        self,
        identifier: str,
        workdir: Path,
        python: Path,
        entrypoint: str,
        *,
        env: Mapping[str, str] | None = None,
        max_line_size: int = DEFAULT_MAX_LINE,
        stderr_tail_bytes: int = 8192,
        kill_grace: float = 3.0,
    ) -> None:
        self.identifier = identifier
        self.workdir = Path(workdir)
        self.python = Path(python)
        self.entrypoint = entrypoint
        self.max_line_size = max_line_size
        self.kill_grace = kill_grace
        self.started_at: float | None = None  # time.monotonic()
        self.exited_at: float | None = None
        self.last_heartbeat: float | None = None
        self._env = plugin_env(env)
        self._tail_bytes = stderr_tail_bytes
        self._popen: subprocess.Popen[bytes] | None = None
        self._reader: OutputReader | None = None
        self._sessions = SessionTable(identifier)
        self._ready: anyio.Event | None = None
        self._exited: anyio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stdin_fd = -1
        self._outbox = bytearray()  # request lines not written yet, whole lines, in order
        self._writing = False  # a write is scheduled, or waits for room in the pipe
        self._stdin_error: OSError | None = None
        self._exit: _Exit | None = None
        self._is_ready = False
        self._stopping = False
        self._kill_reason: str | None = None

    # ------------------------------------------------------------------ state

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    @property
    def alive(self) -> bool:
        """Ready and usable: started, heartbeat seen, not exited, not being stopped."""
        return self._is_ready and self._exit is None and not self._stopping

    @property
    def became_ready(self) -> bool:
        """Whether the first heartbeat ever came (it stays true after an exit)."""
        return self._is_ready

    @property
    def starting(self) -> bool:
        """Spawned, not ready yet, not exited: a later caller may still wait for it."""
        return (
            self._popen is not None
            and not self._is_ready
            and self._exit is None
            and not self._stopping
        )

    @property
    def in_flight(self) -> int:
        return len(self._sessions)

    @property
    def stderr_tail(self) -> str:
        return self._reader.stderr_tail if self._reader is not None else ""

    @property
    def declaration(self) -> dict[str, Any] | None:
        """The manifest as the SDK parsed it: the first line the plugin wrote."""
        return self._reader.declaration if self._reader is not None else None

    def _stderr_note(self) -> str:
        tail = self.stderr_tail.strip()
        return f"; stderr: {tail[-2000:]}" if tail else ""

    # ------------------------------------------------------------------ start

    async def start(self, ready_timeout: float) -> None:
        """Spawn the process and wait for its first heartbeat (``plugin_start_failed`` if none)."""
        self.spawn()
        try:
            if not await self.wait_ready(ready_timeout):
                raise self.no_heartbeat_error(ready_timeout)
        except BaseException:
            await self.aclose()
            raise

    def spawn(self) -> None:
        """Start the process and its reader; readiness comes later (:meth:`wait_ready`).

        Call it on the event loop. Spawning there, not in a worker thread, is deliberate: a
        thread could be abandoned by a cancellation after the fork and leave an unowned process.
        """
        if self._popen is not None:
            raise RuntimeError("PluginProcess.spawn() called twice")
        warn_if_pid1()
        if not self.python.exists():
            raise PlugindError(
                "plugin_start_failed",
                f"{self.identifier}: interpreter {self.python} does not exist "
                "(the plugin environment is missing)",
            )
        token = anyio.lowlevel.current_token()
        self._loop = asyncio.get_running_loop()
        self._ready, self._exited = anyio.Event(), anyio.Event()
        try:
            self._popen = subprocess.Popen(
                [str(self.python), "-m", self.entrypoint],
                cwd=self.workdir,
                env=self._env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                bufsize=0,
            )
        except OSError as exc:
            raise PlugindError(
                "plugin_start_failed", f"{self.identifier}: cannot run {self.python}: {exc}"
            ) from None
        self.started_at = time.monotonic()
        assert self._popen.stdin is not None
        self._stdin_fd = self._popen.stdin.fileno()
        os.set_blocking(self._stdin_fd, False)
        self._reader = OutputReader(
            self._popen,
            self.identifier,
            token,
            deliver=self._deliver,
            on_exit=self._on_exit,
            max_line=self.max_line_size,
            tail_bytes=self._tail_bytes,
            kill_grace=self.kill_grace,
        )
        self._reader.start()

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the first heartbeat: ``True`` once ready, else ``False``.

        Raises ``plugin_start_failed`` if the process exited (or was stopped) instead.
        """
        if self._ready is None:
            raise RuntimeError("PluginProcess.wait_ready() before spawn()")
        with anyio.move_on_after(max(timeout, 0)):
            await self._ready.wait()
        if self._exit is not None or self._stopping:
            raise self.exit_error()
        return self._is_ready

    def exit_error(self) -> PlugindError:
        """Why a process that was expected to become ready did not."""
        if self._stopping:
            what = "was stopped while it was starting"
        else:
            returncode = self._exit.returncode if self._exit else None
            when = "right after it was ready" if self._is_ready else "before it was ready"
            what = f"{self._ended(returncode)} {when}"
        return PlugindError("plugin_start_failed", f"{self.identifier} {what}{self._stderr_note()}")

    def no_heartbeat_error(self, ready_timeout: float) -> PlugindError:
        return PlugindError(
            "plugin_start_failed",
            f"{self.identifier} sent no heartbeat within {ready_timeout:g}s of starting"
            f"{self._stderr_note()}",
        )

    # ------------------------------------------------------------------ invoke

    async def invoke(
        self,
        request: PluginRequest,
        *,
        timeout: float,
        on_chunk: ChunkCallback | None = None,
        max_result_size: int,
        backwards: Backwards | None = None,
    ) -> list[Any]:
        """Run one session; the ``stream`` chunks in order once the plugin sends ``end``.

        The plugin's calls back into Dify go to ``backwards``, each in a task of its own, so a
        streamed answer flows while the session's other replies are read; without it they are
        refused at once. Calls still running when the session ends are cancelled.

        Raises ``plugin_error`` (the plugin raised), ``plugin_crashed`` (the process died or
        was stopped), ``timeout`` (the session is abandoned; the process keeps running) or
        ``result_too_large``.
        """
        if not self.alive:
            raise PlugindError("plugin_crashed", f"{self.identifier} is not running")
        session_id = new_event_id()  # any unique id; a UUIDv7 is the cheapest we make
        line = protocol.encode_request(session_id, request)
        receive = self._sessions.open(session_id, max_result_size)
        chunks: list[Any] = []
        failure: Exception | None = None
        ended = False
        try:
            with receive, anyio.move_on_after(timeout) as scope:
                # The calls' tasks never raise; the loop's errors are kept, not raised in the
                # group, so they leave it as they are rather than wrapped in an ExceptionGroup.
                async with anyio.create_task_group() as calls:
                    try:
                        await self._write(line)
                        async for kind, value in receive:
                            if kind == "chunk":
                                chunks.append(value)
                                if on_chunk is not None:
                                    await on_chunk(value)
                            elif kind == "end":
                                ended = True
                                break
                            elif kind == "error":
                                failure = value
                                break
                            elif kind == "invoke":
                                calls.start_soon(
                                    serve_call,
                                    self._write,
                                    self.identifier,
                                    session_id,
                                    request,
                                    value,
                                    backwards,
                                )
                    except Exception as exc:
                        failure = exc
                    calls.cancel_scope.cancel()  # the plugin no longer waits for them
            if failure is not None:
                raise failure
            if ended:
                return chunks
            if scope.cancelled_caught:
                raise TimedOut(
                    f"{self.identifier} did not finish {request.access}/{request.action} "
                    f"within {timeout:g}s"
                )
            raise PlugindError("plugin_crashed", f"{self.identifier} dropped the session")
        finally:
            self._sessions.close(session_id)

    async def _write(self, line: bytes) -> None:
        """Queue ``line`` for the plugin's stdin (see the module docstring).

        Returns at once; a write that fails later fails the sessions in flight, as the
        process's exit would. Raises ``plugin_crashed`` if stdin is already known broken.
        """
        if self._stdin_error is not None:
            raise self._stdin_broken(self._stdin_error)
        assert self._loop is not None
        self._outbox += line
        if not self._writing:
            self._writing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what the outbox holds; on a full pipe, wait for room (runs on the loop)."""
        outbox = self._outbox
        try:
            while outbox:
                written = os.write(self._stdin_fd, outbox)
                del outbox[:written]
        except BlockingIOError:
            assert self._loop is not None
            self._loop.add_writer(self._stdin_fd, self._on_writable)
            return
        except (OSError, ValueError) as exc:  # ValueError: the pipe was closed meanwhile
            error = exc if isinstance(exc, OSError) else OSError(str(exc))
            self._stdin_error = error
            outbox.clear()
            self._sessions.fail_all(lambda: self._stdin_broken(error))
        self._writing = False

    def _on_writable(self) -> None:
        assert self._loop is not None
        self._loop.remove_writer(self._stdin_fd)
        self._flush()

    def _stop_writing(self) -> None:
        """Drop what is not written yet and stop waiting for room (the process is stopping)."""
        if self._writing and self._loop is not None and self._stdin_fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._stdin_fd)
        self._outbox.clear()

    def _stdin_broken(self, exc: OSError) -> PlugindError:
        return PlugindError("plugin_crashed", f"{self.identifier} stopped reading requests ({exc})")

    # ------------------------------------------------------------------ stop

    async def aclose(self) -> None:
        """Stop the process: SIGTERM to its group, SIGKILL after the grace; wait for it."""
        popen = self._popen
        if popen is None or self._exited is None:
            return
        with anyio.CancelScope(shield=True):
            first = not self._stopping
            self._stopping = True
            if first and not self._exited.is_set():
                self._signal_group(signal.SIGTERM, None)
            with anyio.move_on_after(self.kill_grace):
                await self._exited.wait()
            if not self._exited.is_set():
                self._signal_group(
                    signal.SIGKILL, f"still running {self.kill_grace:g}s after SIGTERM"
                )
                with anyio.move_on_after(10):
                    await self._exited.wait()
            reader = self._reader
            if reader is not None and reader.is_alive():
                await anyio.to_thread.run_sync(reader.join, 5.0)
            if reader is None or not reader.is_alive():
                self._stop_writing()
                for pipe in (popen.stdin, popen.stdout, popen.stderr):
                    if pipe is not None and not pipe.closed:
                        pipe.close()

    def kill(self, reason: str) -> None:
        """SIGKILL the group now (from any thread); ``reason`` goes into the sessions' errors."""
        self._kill_reason = reason
        self._signal_group(signal.SIGKILL, reason)

    def _ended(self, returncode: int | None) -> str:
        if self._kill_reason is not None and returncode == -signal.SIGKILL:
            return f"was killed ({self._kill_reason})"
        return describe_exit(returncode)

    def _signal_group(self, sig: signal.Signals, reason: str | None) -> None:
        if self._popen is None:
            return
        if reason:
            log.warning(
                "Killing plugin process %s pid=%d: %s", self.identifier, self._popen.pid, reason
            )
        signal_group(self._popen.pid, sig)

    # ------------------------------------------------------------------ loop side

    def _deliver(self, batch: list[protocol.PluginMessage]) -> None:
        for message in batch:
            if isinstance(message, protocol.Heartbeat):
                self.last_heartbeat = time.monotonic()
                if not self._is_ready:
                    self._is_ready = True
                    assert self._ready is not None
                    self._ready.set()
                    log.info(
                        "Plugin process started: %s pid=%s in %.2fs",
                        self.identifier,
                        self.pid,
                        self.last_heartbeat - (self.started_at or self.last_heartbeat),
                    )
            else:
                self._sessions.route(message)

    def _on_exit(self, returncode: int | None) -> None:
        self._exit = _Exit(returncode)
        self.exited_at = time.monotonic()
        pid, ended = self.pid, self._ended(returncode)
        if self._stopping:
            log.info("Plugin process stopped: %s pid=%s", self.identifier, pid)
        else:
            log.warning(
                "Plugin process exited: %s pid=%s %s%s%s",
                self.identifier,
                pid,
                ended,
                "" if self._is_ready else " before it was ready",
                self._stderr_note(),
            )
        if self._stopping:
            message = f"{self.identifier} was stopped (uninstall or shutdown) while the request ran"
        else:
            message = (
                f"{self.identifier} (pid {pid}) {ended} while the request ran{self._stderr_note()}"
            )
        self._sessions.fail_all(lambda: PlugindError("plugin_crashed", message))
        assert self._ready is not None and self._exited is not None
        self._ready.set()
        self._exited.set()
