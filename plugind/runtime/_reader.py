"""The thread that reads one plugin process's stdout and stderr.

Why a thread and not a task: see :mod:`plugind.runtime.process`. The thread owns nothing but
the reading end of the two pipes. It parses lines, logs what is for operators (plugin logs,
stderr, stray prints) itself, and hands everything that concerns sessions to the event loop in
batches, one ``from_thread.run_sync`` call per read. It ends at EOF, when it reaps the process
and reports the exit status; if the event loop has gone, it kills the process instead, so a
plugin never outlives the daemon that managed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import anyio.from_thread
import anyio.lowlevel

from plugind.runtime import protocol

log = logging.getLogger(__name__)
# Not __name__, on purpose: what plugins write to stderr is their log, not this module's, and one
# channel of its own lets an operator route or silence it apart from plugind's own lines.
plugin_log = logging.getLogger("plugind.plugin")

_READ_SIZE = 1024 * 1024
_LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARN": 30, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_pid1_warned = False
_QUIET_POLLS = 2  # one-second polls after exit before giving up on pipes a child holds open

Deliver = Callable[[list[protocol.PluginMessage]], None]
OnExit = Callable[[int | None], None]


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


def warn_if_pid1() -> None:
    """The SDK exits when its parent is PID 1 (it takes that as "the daemon died"): say so."""
    global _pid1_warned
    if os.getpid() == 1 and not _pid1_warned:
        _pid1_warned = True
        log.warning(
            "plugind runs as PID 1: the Dify SDK makes plugins exit when their parent is PID 1; "
            "run plugind under an init such as tini"
        )


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by ``pid`` (the plugin and anything it spawned)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class OutputReader:
    """Reads a plugin's output until EOF; ``deliver`` and ``on_exit`` run on the event loop."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        identifier: str,
        token: anyio.lowlevel.EventLoopToken,
        *,
        deliver: Deliver,
        on_exit: OnExit,
        max_line: int,
        tail_bytes: int,
        kill_grace: float,
    ) -> None:
        self.identifier = identifier
        self.declaration: dict[str, Any] | None = None
        self._popen = popen
        self._token = token
        self._deliver = deliver
        self._on_exit = on_exit
        self._splitter = protocol.LineSplitter(max_line)
        self._tail = bytearray()
        self._tail_bytes = tail_bytes
        self._pending_err = bytearray()
        self._kill_grace = kill_grace
        self._thread = threading.Thread(target=self._run, name=f"plugin-{popen.pid}", daemon=True)

    @property
    def stderr_tail(self) -> str:
        return self._tail.decode("utf-8", "replace")

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _kill(self, reason: str) -> None:
        log.warning(
            "Killing plugin process %s pid=%d: %s", self.identifier, self._popen.pid, reason
        )
        signal_group(self._popen.pid, signal.SIGKILL)

    def _run(self) -> None:
        popen = self._popen
        assert popen.stdout is not None and popen.stderr is not None
        out_fd, err_fd = popen.stdout.fileno(), popen.stderr.fileno()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(out_fd, selectors.EVENT_READ)
                selector.register(err_fd, selectors.EVENT_READ)
                open_fds, quiet_polls = 2, 0
                while open_fds:
                    events = selector.select(timeout=1.0)
                    if not events:
                        # Exited, while a child it left behind still holds the pipes open.
                        if popen.poll() is not None:
                            quiet_polls += 1
                            if quiet_polls >= _QUIET_POLLS:
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
                            if not self._on_stdout(self._splitter.feed(data)):
                                return
                        else:
                            self._on_stderr(data)
            self._on_stdout(self._splitter.flush())
            if self._pending_err:
                self._on_stderr(b"\n")
        except Exception:
            log.exception("Reader of plugin %s failed", self.identifier)
        finally:
            returncode = self._reap()
            self._to_loop(self._on_exit, returncode)

    def _reap(self) -> int | None:
        popen = self._popen
        try:
            returncode: int | None = popen.wait(timeout=self._kill_grace)
        except subprocess.TimeoutExpired:
            self._kill("its output ended but it kept running")
            try:
                returncode = popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                returncode = None
        signal_group(popen.pid, signal.SIGKILL)  # whatever it started goes with it
        return returncode

    def _to_loop(self, func: Callable[..., None], *args: Any) -> bool:
        """Run ``func`` on the event loop; ``False`` once the loop is gone.

        On asyncio the call is queued without waiting for it (``call_soon_threadsafe`` keeps the
        order): waiting cost a condition-variable round trip per batch on both threads, which
        under load was a sixth of the daemon's CPU.
        """
        loop = self._token.native_token
        if isinstance(loop, asyncio.AbstractEventLoop):
            try:
                loop.call_soon_threadsafe(self._guarded, func, *args)
            except RuntimeError:  # the loop is closed
                self._kill("its event loop has gone")
                return False
            return True
        try:
            anyio.from_thread.run_sync(func, *args, token=self._token)
        except Exception:
            self._kill("its event loop has gone")  # nobody is left to manage it
            return False
        return True

    def _guarded(self, func: Callable[..., None], *args: Any) -> None:
        try:
            func(*args)
        except Exception:
            log.exception("Handling output of plugin %s failed", self.identifier)

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
                plugin_log.warning(
                    "%s could not read a request: %s", self.identifier, message.message
                )
            elif isinstance(message, protocol.Garbage):
                plugin_log.info("%s wrote to stdout: %s", self.identifier, message.text)
            else:
                batch.append(message)
        return self._to_loop(self._deliver, batch) if batch else True

    def _on_stderr(self, data: bytes) -> None:
        tail = self._tail
        tail += data
        if len(tail) > self._tail_bytes:
            del tail[: len(tail) - self._tail_bytes]
        pending = self._pending_err
        pending += data
        *lines, rest = bytes(pending).split(b"\n")
        pending[:] = rest[-65536:]
        for line in lines:
            if line.strip():
                text = line[:2000].decode("utf-8", "replace").rstrip()
                plugin_log.warning("%s stderr: %s", self.identifier, text)
