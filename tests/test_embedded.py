"""Embedded Valkey and Postgres against the real servers: persistence, stop, crashes, runtime."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest
import redis

from plugind.embedded import (
    EmbeddedUrls,
    embedded_services,
    read_runtime_file,
    start_embedded_postgres,
    start_embedded_redis,
)
from plugind.embedded.process import processes_in
from plugind.errors import DataDirInUseError


@pytest.fixture
def tmp_root() -> Iterator[Path]:
    """A temporary root outside pytest's basetemp.

    As root, Postgres runs as another user who must traverse to its data dir, and every pytest
    session that starts (in another terminal, say) resets /tmp/pytest-of-root to 0700.
    """
    path = Path(tempfile.mkdtemp(prefix="plugind-embedded-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _pids(data_dir: Path, name: str) -> set[int]:
    return {p.pid for p in processes_in(data_dir, name)}


def _fetchval(url: str, query: str) -> object:
    """One statement on a fresh connection, from a sync test (the servers start blocking)."""

    async def run() -> object:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    return anyio.run(run)


_CREATE = "CREATE TABLE survivor AS SELECT 'yes'::text AS v"
_READ = "SELECT v FROM survivor"


def test_valkey_keeps_data_across_restarts_and_stops_cleanly(tmp_root: Path) -> None:
    data_dir = tmp_root / "valkey"
    server = start_embedded_redis(data_dir)
    assert server.url.startswith("redis://127.0.0.1:")
    with redis.Redis.from_url(server.url) as client:
        assert client.ping()
        client.set("survivor", "yes")
    server.stop()
    server.stop()  # idempotent
    assert not _pids(data_dir, "valkey-server")

    again = start_embedded_redis(data_dir)
    try:
        with redis.Redis.from_url(again.url) as client:
            assert client.get("survivor") == b"yes"
            assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        again.stop()
    assert not _pids(data_dir, "valkey-server")


def test_a_data_dir_in_use_is_refused(tmp_root: Path) -> None:
    server = start_embedded_redis(tmp_root / "valkey")
    try:
        with pytest.raises(DataDirInUseError, match=str(os.getpid())):
            start_embedded_redis(tmp_root / "valkey")
    finally:
        server.stop()


def test_postgres_keeps_data_across_restarts_and_stops_cleanly(tmp_root: Path) -> None:
    data_dir = tmp_root / "postgres"
    server = start_embedded_postgres(data_dir)
    assert server.url.startswith("postgresql://postgres@127.0.0.1:")
    assert server.url.endswith("/plugind")
    _fetchval(server.url, _CREATE)
    server.stop()
    server.stop()  # idempotent
    assert not _pids(data_dir, "postgres")

    again = start_embedded_postgres(data_dir)
    try:
        assert _fetchval(again.url, _READ) == "yes"
    finally:
        again.stop()
    assert not _pids(data_dir, "postgres")


_CRASHING_DAEMON = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from plugind.embedded import start_embedded_postgres, start_embedded_redis

    root = Path(sys.argv[1])
    valkey = start_embedded_redis(root / "valkey")
    postgres = start_embedded_postgres(root / "postgres")
    print(valkey.url, postgres.url, flush=True)
    time.sleep(600)
    """
)


def test_servers_left_by_a_crashed_daemon_are_replaced(tmp_root: Path) -> None:
    daemon = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_DAEMON, str(tmp_root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert daemon.stdout is not None
    redis_url, database_url = daemon.stdout.readline().split()
    with redis.Redis.from_url(redis_url) as client:
        client.set("survivor", "yes")
    _fetchval(database_url, _CREATE)
    daemon.kill()  # SIGKILL: no chance to stop its servers
    daemon.wait()
    daemon.stdout.close()
    old = _pids(tmp_root / "valkey", "valkey-server") | _pids(tmp_root / "postgres", "postgres")
    assert old, "the servers should outlive the crashed daemon"

    valkey = start_embedded_redis(tmp_root / "valkey")
    postgres = start_embedded_postgres(tmp_root / "postgres")
    try:
        new = _pids(tmp_root / "valkey", "valkey-server") | _pids(tmp_root / "postgres", "postgres")
        assert not old & new
        with redis.Redis.from_url(valkey.url) as client:
            assert client.get("survivor") == b"yes"
        assert _fetchval(postgres.url, _READ) == "yes"
    finally:
        valkey.stop()
        postgres.stop()


def test_a_stale_postmaster_pid_of_a_killed_server_is_handled(tmp_root: Path) -> None:
    data_dir = tmp_root / "postgres"
    server = start_embedded_postgres(data_dir)
    for pid in _pids(data_dir, "postgres"):
        with contextlib.suppress(ProcessLookupError):  # children die with their postmaster
            os.kill(pid, signal.SIGKILL)
    server.stop()  # the server is gone already: must neither fail nor hang
    pid_file = data_dir / "postmaster.pid"
    assert pid_file.exists()
    # The worst case: the pid in the file now belongs to a live process of the server's own
    # user (pid reuse after a container restart), which postgres itself takes for a running
    # server and refuses to start.
    owner = data_dir.stat().st_uid
    sleeper = subprocess.Popen(["sleep", "60"], user=owner if os.geteuid() == 0 else None)
    try:
        lines = pid_file.read_text().splitlines()
        pid_file.write_text("\n".join([str(sleeper.pid), *lines[1:]]) + "\n")
        again = start_embedded_postgres(data_dir)
        try:
            assert _fetchval(again.url, "SELECT 1") == 1
        finally:
            again.stop()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.anyio
async def test_embedded_services_publish_their_urls_while_they_run(tmp_root: Path) -> None:
    assert read_runtime_file(tmp_root) is None
    async with embedded_services(tmp_root, redis=True, postgres=True) as urls:
        assert urls.redis_url is not None and urls.database_url is not None
        assert (tmp_root / "runtime.json").exists()
        assert read_runtime_file(tmp_root) == urls
        conn = await asyncpg.connect(urls.database_url)
        await conn.close()
    assert not (tmp_root / "runtime.json").exists()
    assert read_runtime_file(tmp_root) is None
    assert not _pids(tmp_root / "valkey", "valkey-server")
    assert not _pids(tmp_root / "postgres", "postgres")

    async with embedded_services(tmp_root, redis=False, postgres=False) as nothing:
        assert nothing == EmbeddedUrls()
        assert not (tmp_root / "runtime.json").exists()
    async with embedded_services(tmp_root, redis=True, postgres=False) as only_redis:
        assert only_redis == EmbeddedUrls(redis_url=only_redis.redis_url, database_url=None)
        assert read_runtime_file(tmp_root) == only_redis
    # A file left by a crashed daemon whose servers are gone names nothing that answers.
    stale = {"redis_url": only_redis.redis_url, "database_url": None, "pid": 1}
    (tmp_root / "runtime.json").write_text(json.dumps(stale))
    assert read_runtime_file(tmp_root) is None
