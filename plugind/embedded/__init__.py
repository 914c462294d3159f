"""Embedded Valkey and Postgres: the zero-set-up default of ``plugind serve`` (docs/operations.md).

With ``REDIS_URL`` / ``DATABASE_URL`` unset the daemon runs its own servers, bound to 127.0.0.1,
with their data under one root (``PLUGIND_DATA_DIR``, default ``./.plugind``), so a first try
needs no set-up and still keeps its plugins and history across restarts. While they run,
``<root>/runtime.json`` names their URLs so that client commands in another terminal find them.

The servers live in ``valkey`` and ``postgres`` beside this module; this is the public face.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from plugind.embedded.postgres import POSTGRES_PORT, start_embedded_postgres
from plugind.embedded.process import EmbeddedServer
from plugind.embedded.valkey import VALKEY_PORT, redis_answers, start_embedded_redis

__all__ = [
    "POSTGRES_PORT",
    "RUNTIME_FILE",
    "VALKEY_PORT",
    "EmbeddedServer",
    "EmbeddedUrls",
    "embedded_services",
    "read_runtime_file",
    "start_embedded_postgres",
    "start_embedded_redis",
]

log = logging.getLogger(__name__)

RUNTIME_FILE = "runtime.json"


@dataclass(frozen=True)
class EmbeddedUrls:
    """The URLs of the embedded servers that run; None for a service configured elsewhere."""

    redis_url: str | None = None
    database_url: str | None = None


@contextlib.asynccontextmanager
async def embedded_services(
    root: Path, *, redis: bool, postgres: bool
) -> AsyncIterator[EmbeddedUrls]:
    """Run the requested embedded servers (data in ``root/valkey``, ``root/postgres``) for the
    duration of the block, with ``root/runtime.json`` naming them; stop them on the way out.

    Starting blocks for up to a minute (initdb, recovery), so it runs in a worker thread; the
    thread is shielded from cancellation so a server it started is never lost unstopped.
    """
    root = Path(await anyio.Path(root).resolve())
    await anyio.Path(root).mkdir(parents=True, exist_ok=True)
    servers: list[EmbeddedServer] = []
    starts: list[tuple[Callable[[Path], EmbeddedServer], str]] = []
    if redis:
        starts.append((start_embedded_redis, "valkey"))
    if postgres:
        starts.append((start_embedded_postgres, "postgres"))
    try:
        for start, folder in starts:
            with anyio.CancelScope(shield=True):
                servers.append(await anyio.to_thread.run_sync(start, root / folder))
        by_name = {server.name: server.url for server in servers}
        urls = EmbeddedUrls(redis_url=by_name.get("valkey"), database_url=by_name.get("postgres"))
        if not servers:
            yield urls
            return
        _write_runtime_file(root, urls)
        try:
            yield urls
        finally:
            _remove_runtime_file(root)
    finally:
        with anyio.CancelScope(shield=True):
            for server in reversed(servers):
                try:
                    await anyio.to_thread.run_sync(server.stop)
                except Exception:
                    log.exception(
                        "Embedded %s did not stop cleanly (data: %s)",
                        server.name.capitalize(),
                        server.data_dir,
                    )


def read_runtime_file(root: Path) -> EmbeddedUrls | None:
    """The URLs a running daemon's embedded servers published under ``root``.

    None when there is no such file or a server it names does not answer (the daemon stopped,
    or crashed and left the file), so a caller can fall back to its own error message.
    """
    try:
        data = json.loads((root / RUNTIME_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    redis_url = data.get("redis_url")
    database_url = data.get("database_url")
    redis_url = redis_url if isinstance(redis_url, str) else None
    database_url = database_url if isinstance(database_url, str) else None
    if redis_url is None and database_url is None:
        return None
    if redis_url is not None and not _answers(redis_url, redis_answers):
        return None
    if database_url is not None and not _answers(database_url, _postgres_answers):
        return None
    return EmbeddedUrls(redis_url=redis_url, database_url=database_url)


def _answers(url: str, probe: Callable[[str, int], bool]) -> bool:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return False
    return parts.hostname is not None and port is not None and probe(parts.hostname, port)


def _postgres_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Postgres server at ``host:port`` answers an SSLRequest (with 'S' or 'N')."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("!ii", 8, 80877103))
            return sock.recv(1) in (b"S", b"N")
    except OSError:
        return False


def _write_runtime_file(root: Path, urls: EmbeddedUrls) -> None:
    payload = {"redis_url": urls.redis_url, "database_url": urls.database_url, "pid": os.getpid()}
    path = root / RUNTIME_FILE
    staging = path.with_name(f".{RUNTIME_FILE}.{os.getpid()}")
    staging.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(staging, path)  # readers never see half a file


def _remove_runtime_file(root: Path) -> None:
    """Remove the runtime file if it is still ours (another daemon may have replaced it)."""
    path = root / RUNTIME_FILE
    try:
        owner = json.loads(path.read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return
    if owner == os.getpid():
        path.unlink(missing_ok=True)
