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
state is touched on the loop only. Requests are written from the loop, non-blocking.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import selectors
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectSendStream

from plugind.errors import PlugindError
from plugind.runtime import protocol
from plugind.runtime._env import plugin_env
from plugind.runtime.protocol import PluginRequest

__all__ = ["ChunkCallback", "PluginProcess", "PluginRequest"]

log = logging.getLogger("plugind.runtime")
plugin_log = logging.getLogger("plugind.plugin")

ChunkCallback = Callable[[Any], Awaitable[None]]

DEFAULT_MAX_LINE = 64 * 1024 * 1024
_READ_SIZE = 1024 * 1024
_LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARN": 30, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_pid1_warned = False


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


@dataclass(frozen=True, slots=True)
class _Exit:
    returncode: int | None
    stderr_tail: str


class _Session:
    """The loop-side end of one invocation: items go to the waiting :meth:`invoke`."""

    __slots__ = ("done", "max_size", "received", "send")

    def __init__(self, send: MemoryObjectSendStream[tuple[str, Any]], max_size: int) -> None:
        self.send = send
        self.max_size = max_size
        self.received = 0
        self.done = False

    def put(self, kind: str, value: Any) -> None:
        if not self.done:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                self.send.send_nowait((kind, value))

    def finish(self, kind: str, value: Any) -> None:
        self.put(kind, value)
        self.done = True


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
        self.declaration: dict[str, Any] | None = None
        self.started_at: float | None = None  # time.monotonic()
        self.exited_at: float | None = None
        self.last_heartbeat: float | None = None
        self._env = plugin_env(env)
        self._tail_bytes = stderr_tail_bytes
        self._stderr_tail = bytearray()
        self._popen: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._sessions: dict[str, _Session] = {}
        self._ready: anyio.Event | None = None
        self._exited: anyio.Event | None = None
        self._write_lock: anyio.Lock | None = None
        self._exit: _Exit | None = None
        self._is_ready = False
        self._stopping = False

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
    def in_flight(self) -> int:
        return len(self._sessions)

    @property
    def stderr_tail(self) -> str:
        return self._stderr_tail.decode("utf-8", "replace")

    def _stderr_note(self) -> str:
        tail = self.stderr_tail.strip()
        return f"; stderr: {tail[-2000:]}" if tail else ""

    # ------------------------------------------------------------------ start

    async def start(self, ready_timeout: float) -> None:
        """Spawn the process and wait for its first heartbeat (``plugin_start_failed`` if none)."""
        if self._popen is not None:
            raise RuntimeError("PluginProcess.start() called twice")
        _warn_if_pid1()
        if not self.python.exists():
            raise PlugindError(
                "plugin_start_failed",
                f"{self.identifier}: interpreter {self.python} does not exist "
                "(the plugin environment is missing)",
            )
        self._token = anyio.lowlevel.current_token()
        self._ready, self._exited, self._write_lock = anyio.Event(), anyio.Event(), anyio.Lock()
        try:
            # Spawned on the loop on purpose: a worker thread could be abandoned by a
            # cancellation after the fork and leave an unowned process behind.
            self._popen = subprocess.Popen(  # noqa: ASYNC220 - fork+exec takes milliseconds
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
        os.set_blocking(self._popen.stdin.fileno(), False)
        self._thread = threading.Thread(
            target=self._pump, name=f"plugin-{self._popen.pid}", daemon=True
        )
        self._thread.start()
        try:
            with anyio.move_on_after(ready_timeout):
                await self._ready.wait()
            if self._is_ready and self._exit is None:
                log.info(
                    "Plugin process started: %s pid=%d in %.2fs",
                    self.identifier,
                    self._popen.pid,
                    time.monotonic() - self.started_at,
                )
                return
            if self._exit is not None:
                raise PlugindError(
                    "plugin_start_failed",
                    f"{self.identifier} {describe_exit(self._exit.returncode)} before it was "
                    f"ready{self._stderr_note()}",
                )
            raise PlugindError(
                "plugin_start_failed",
                f"{self.identifier} sent no heartbeat within {ready_timeout:g}s of starting"
                f"{self._stderr_note()}",
            )
        except BaseException:
            await self.aclose()
            raise

    # ------------------------------------------------------------------ invoke

    async def invoke(
        self,
        request: PluginRequest,
        *,
        timeout: float,
        on_chunk: ChunkCallback | None = None,
        max_result_size: int,
    ) -> list[Any]:
        """Run one session; the ``stream`` chunks in order once the plugin sends ``end``.

        Raises ``plugin_error`` (the plugin raised), ``plugin_crashed`` (the process died or
        was stopped), ``timeout`` (the session is abandoned; the process keeps running) or
        ``result_too_large``.
        """
        if not self.alive:
            raise PlugindError("plugin_crashed", f"{self.identifier} is not running")
        session_id = str(uuid.uuid4())
        line = protocol.encode_request(session_id, request)
        send, receive = anyio.create_memory_object_stream[tuple[str, Any]](math.inf)
        session = _Session(send, max_result_size)
        self._sessions[session_id] = session
        chunks: list[Any] = []
        try:
            with receive, anyio.move_on_after(timeout) as scope:
                await self._write(line)
                async for kind, value in receive:
                    if kind == "chunk":
                        chunks.append(value)
                        if on_chunk is not None:
                            await on_chunk(value)
                    elif kind == "end":
                        return chunks
                    elif kind == "error":
                        raise value
                    elif kind == "invoke":
                        await self._refuse_backwards(session_id, value)
            if scope.cancelled_caught:
                raise PlugindError(
                    "timeout",
                    f"{self.identifier} did not finish {request.access}/{request.action} "
                    f"within {timeout:g}s",
                )
            raise PlugindError("plugin_crashed", f"{self.identifier} dropped the session")
        finally:
            self._sessions.pop(session_id, None)
            session.done = True
            send.close()

    async def _refuse_backwards(self, session_id: str, data: Any) -> None:
        detail = data if isinstance(data, dict) else {}
        what = detail.get("type", "?")
        log.warning(
            "Plugin %s asked Dify for %s (a backwards invocation); plugind does not relay those",
            self.identifier,
            what,
        )
        await self._write(
            protocol.encode_backwards_error(
                session_id,
                str(detail.get("backwards_request_id", "")),
                f"plugind cannot relay backwards invocations ({what}) to Dify",
            )
        )

    async def _write(self, line: bytes) -> None:
        assert self._popen is not None and self._popen.stdin is not None
        assert self._write_lock is not None
        fd = self._popen.stdin.fileno()
        async with self._write_lock:
            view = memoryview(line)
            written = 0
            try:
                while written < len(view):
                    try:
                        written += os.write(fd, view[written:])
                    except BlockingIOError:
                        await anyio.wait_writable(fd)
            except (OSError, anyio.ClosedResourceError) as exc:
                raise PlugindError(
                    "plugin_crashed", f"{self.identifier} stopped reading requests ({exc})"
                ) from None
            except BaseException:
                if 0 < written < len(view):
                    # Half a line in the pipe would corrupt the next request: restart instead.
                    self._signal_group(signal.SIGKILL, "a request was cut off half-written")
                raise

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
                self._signal_group(signal.SIGKILL, f"still running {self.kill_grace:g}s after SIGTERM")
                with anyio.move_on_after(10):
                    await self._exited.wait()
            thread = self._thread
            if thread is not None and thread.is_alive():
                await anyio.to_thread.run_sync(thread.join, 5.0)
            if thread is None or not thread.is_alive():
                for pipe in (popen.stdin, popen.stdout, popen.stderr):
                    if pipe is not None and not pipe.closed:
                        if pipe is popen.stdin:
                            anyio.notify_closing(pipe.fileno())
                        pipe.close()

    def _signal_group(self, sig: signal.Signals, reason: str | None) -> None:
        if self._popen is None:
            return
        if reason:
            log.warning("Killing plugin process %s pid=%d: %s", self.identifier, self._popen.pid, reason)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, sig)

    # ------------------------------------------------------------------ reader thread

    def _pump(self) -> None:
        popen = self._popen
        assert popen is not None and popen.stdout is not None and popen.stderr is not None
        out_fd, err_fd = popen.stdout.fileno(), popen.stderr.fileno()
        splitter = protocol.LineSplitter(self.max_line_size)
        stderr_pending = bytearray()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(out_fd, selectors.EVENT_READ)
                selector.register(err_fd, selectors.EVENT_READ)
                open_fds = 2
                exited_quietly = 0
                while open_fds:
                    events = selector.select(timeout=1.0)
                    if not events:
                        # Exited, but a child it left behind still holds the pipes open.
                        if popen.poll() is not None:
                            exited_quietly += 1
                            if exited_quietly >= 2:
                                break
                        continue
                    for key, _ in events:
                        try:
                            data = os.read(key.fd, _READ_SIZE)
                        except OSError:
                            data = b""
                        if not data:
                            selector.unregister(key.fd)
                            open_fds -= 1
                        elif key.fd == out_fd:
                            if not self._on_stdout(splitter.feed(data)):
                                return
                        else:
                            self._on_stderr(data, stderr_pending)
            self._on_stdout(splitter.flush())
            if stderr_pending:
                self._on_stderr(b"\n", stderr_pending)
        except Exception:
            log.exception("Reader of plugin %s failed", self.identifier)
        finally:
            returncode = self._reap(popen)
            self._to_loop(self._on_exit, returncode)

    def _reap(self, popen: subprocess.Popen[bytes]) -> int | None:
        try:
            returncode: int | None = popen.wait(timeout=self.kill_grace)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL, "its output ended but it kept running")
            try:
                returncode = popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                returncode = None
        # Anything it started in its process group goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        return returncode

    def _to_loop(self, func: Callable[..., None], *args: Any) -> bool:
        """Run ``func`` on the event loop; ``False`` once the loop is gone."""
        try:
            anyio.from_thread.run_sync(func, *args, token=self._token)
        except Exception:
            # Nobody is left to manage the process: do not leave it running.
            self._signal_group(signal.SIGKILL, "its event loop has gone")
            return False
        return True

    def _on_stdout(self, items: list[bytes | protocol.Oversized]) -> bool:
        batch: list[protocol.PluginMessage] = []
        for item in items:
            message = protocol.decode_line(item) if isinstance(item, bytes) else item
            if isinstance(message, protocol.Log):
                level = _LOG_LEVELS.get(message.level.upper(), logging.INFO)
                plugin_log.log(level, "%s: %s", self.identifier, message.message)
            elif isinstance(message, protocol.Declaration):
                self.declaration = message.data
            elif isinstance(message, protocol.StreamError):
                plugin_log.warning("%s could not read a request: %s", self.identifier, message.message)
            elif isinstance(message, protocol.Garbage):
                plugin_log.info("%s wrote to stdout: %s", self.identifier, message.text)
            else:
                batch.append(message)
        return self._to_loop(self._deliver, batch) if batch else True

    def _on_stderr(self, data: bytes, pending: bytearray) -> None:
        tail = self._stderr_tail
        tail += data
        if len(tail) > self._tail_bytes:
            del tail[: len(tail) - self._tail_bytes]
        pending += data
        *lines, rest = bytes(pending).split(b"\n")
        pending[:] = rest[-65536:]
        for line in lines:
            if line.strip():
                text = line[:2000].decode("utf-8", "replace").rstrip()
                plugin_log.warning("%s stderr: %s", self.identifier, text)

    # ------------------------------------------------------------------ loop side

    def _deliver(self, batch: list[protocol.PluginMessage]) -> None:
        sessions = self._sessions
        for message in batch:
            if isinstance(message, protocol.Heartbeat):
                self.last_heartbeat = time.monotonic()
                if not self._is_ready:
                    self._is_ready = True
                    assert self._ready is not None
                    self._ready.set()
            elif isinstance(message, protocol.Chunk):
                session = sessions.get(message.session_id)
                if session is not None:
                    session.received += message.size
                    if session.received > session.max_size:
                        session.finish("error", self._too_large(session.max_size))
                    else:
                        session.put("chunk", message.data)
            elif isinstance(message, protocol.SessionError):
                session = sessions.get(message.session_id)
                if session is not None:
                    session.finish(
                        "error",
                        PlugindError(
                            "plugin_error",
                            message.message,
                            error_type=message.error_type,
                            args=message.args,
                        ),
                    )
            elif isinstance(message, protocol.End):
                session = sessions.get(message.session_id)
                if session is not None:
                    session.finish("end", None)
            elif isinstance(message, protocol.Invoke):
                session = sessions.get(message.session_id)
                if session is not None:
                    session.put("invoke", message.data)
            elif isinstance(message, protocol.Oversized):
                session = sessions.get(message.session_id or "")
                if session is not None:
                    session.finish("error", self._too_large(session.max_size))
                else:
                    log.warning("%s wrote a %d-byte line; dropped", self.identifier, message.size)

    def _too_large(self, limit: int) -> PlugindError:
        return PlugindError(
            "result_too_large", f"{self.identifier} returned more than {limit} bytes"
        )

    def _on_exit(self, returncode: int | None) -> None:
        self._exit = _Exit(returncode, self.stderr_tail)
        self.exited_at = time.monotonic()
        pid = self.pid
        if self._stopping:
            log.info("Plugin process stopped: %s pid=%s", self.identifier, pid)
        elif self._is_ready:
            log.warning(
                "Plugin process exited: %s pid=%s %s%s",
                self.identifier,
                pid,
                describe_exit(returncode),
                self._stderr_note(),
            )
        for session in list(self._sessions.values()):
            if self._stopping:
                message = f"{self.identifier} was stopped (uninstall or shutdown) while the request ran"
            else:
                message = (
                    f"{self.identifier} (pid {pid}) {describe_exit(returncode)} while the "
                    f"request ran{self._stderr_note()}"
                )
            session.finish("error", PlugindError("plugin_crashed", message))
        assert self._ready is not None and self._exited is not None
        self._ready.set()
        self._exited.set()


def _warn_if_pid1() -> None:
    global _pid1_warned
    if os.getpid() == 1 and not _pid1_warned:
        _pid1_warned = True
        log.warning(
            "plugind runs as PID 1: the Dify SDK makes plugins exit when their parent is PID 1; "
            "run plugind under an init such as tini"
        )

