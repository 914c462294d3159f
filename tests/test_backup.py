"""Backup and restore (docs/operations.md, "Backup and restore"): Postgres is the record.

The runbook as a test: a deployment works, its Postgres schema is dumped with ``pg_dump`` and
restored into a new database, and a node starts on that database with a **fresh, empty Redis**
and an empty ``PLUGIN_DIR`` (a new machine). It carries on: the installed plugins run (the
registry is rebuilt from the read models, the plugin from the package store), the read models
answer for the old requests, new events continue the event log after the old ones, and the
hash chain verifies from genesis.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from e2e import EXAMPLE_CALC, eventually, run_cli

from plugind.bus.codec import text
from plugind.bus.keys import Keys
from plugind.client import Client
from plugind.config import Settings
from plugind.daemon import running_daemon
from plugind.embedded import start_embedded_redis
from plugind.messages import Installed, TaskSucceeded
from plugind.package.difypkg import build_package
from plugind.projections._entries import stream_id_key
from plugind.projections.continuity import continue_stream

pytestmark = pytest.mark.anyio


@pytest.fixture
async def restored_database(admin_database_url: str) -> AsyncIterator[str]:
    """An empty database for the restore, dropped afterwards."""
    name = f"plugind_restore_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = admin_database_url.partition("?")[0].rpartition("/")[0]
    yield f"{base}/{name}"
    admin = await asyncpg.connect(admin_database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _sum(client: Client, a: int) -> TaskSucceeded:
    rid = await client.invoke_tool("acme/calc", "calc", "add", {"a": a, "b": 1}, user_id="u")
    done = await client.wait(rid, 60)
    assert isinstance(done, TaskSucceeded), done
    return done


async def test_a_fresh_redis_is_restored_from_postgres_alone(
    settings: Settings,
    redis: object,
    database_url: str,
    restored_database: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pg_dump, pg_restore = shutil.which("pg_dump"), shutil.which("pg_restore")
    if pg_dump is None or pg_restore is None:
        pytest.skip("pg_dump and pg_restore are needed for the runbook")
    before = replace(settings, node="before", plugin_dir=tmp_path / "before")
    async with running_daemon(before, shutdown_grace_s=5) as daemon:
        assert daemon.redis is not None
        client = Client(daemon.redis, daemon.keys)
        installed = await client.wait(await client.install(build_package(EXAMPLE_CALC)), 300)
        assert isinstance(installed, Installed), installed
        old = [(await _sum(client, a)).request_id for a in range(3)]
        await eventually(
            database_url, "SELECT count(*) FROM tasks WHERE status = 'succeeded'", expect=3
        )

    # the backup: plugind's schema, as the runbook says
    dump = tmp_path / "plugind.dump"
    await anyio.run_process(
        [pg_dump, "--format=custom", "--schema=plugind", f"--file={dump}", database_url]
    )
    await anyio.run_process([pg_restore, "--no-owner", f"--dbname={restored_database}", str(dump)])

    conn = await asyncpg.connect(restored_database, server_settings={"search_path": "plugind"})
    try:
        logged_before = await conn.fetchval("SELECT max(position) FROM event_log")
    finally:
        await conn.close()

    # a new machine: a fresh Redis and an empty PLUGIN_DIR, the restored database
    valkey = await anyio.to_thread.run_sync(lambda: start_embedded_redis(tmp_path / "valkey"))
    try:
        after = replace(
            settings,
            node="after",
            redis_url=valkey.url,
            database_url=restored_database,
            plugin_dir=tmp_path / "after",
        )
        async with running_daemon(after, shutdown_grace_s=5) as daemon:
            assert daemon.redis is not None
            client = Client(daemon.redis, Keys(after.namespace))
            assert "The events stream in Redis was missing from the event log" in caplog.text
            new = await _sum(client, 41)
            assert new.result.chunks and new.request_id not in old
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{daemon.ports['api']}",
                headers={"X-Api-Key": after.api_key or ""},
            ) as http:
                for rid in old:  # the read models answer for what happened before
                    task = (await http.get(f"/api/v1/tasks/{rid}")).json()
                    assert task["status"] == "succeeded", task
            row = await eventually(
                restored_database,
                "SELECT position FROM event_log WHERE request_id = $1 AND type = 'task.succeeded'",
                new.request_id,
            )
            assert row[0] > logged_before  # the log continues after the restored events
            code, out, err = await run_cli(after, "audit", "verify", check=False)
            assert code == 0, (out, err)
            assert '"ok": true' in out
    finally:
        await anyio.to_thread.run_sync(valkey.stop)


def test_pg_dump_matches_the_server() -> None:
    """The runbook's tools exist where the suite runs (else the test above is skipped)."""
    if shutil.which("pg_dump") is None:
        pytest.skip("no pg_dump")
    out = subprocess.run(["pg_dump", "--version"], capture_output=True, text=True, check=True)
    assert "PostgreSQL" in out.stdout


async def test_events_continue_after_the_log_whatever_the_redis_clock(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    """A Redis whose clock is behind the old one's still appends after the event log."""
    future = "99999999999999-7"
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO projection_checkpoints (name, stream, last_stream_id, last_position,"
            " head_hash) VALUES ('event_log', $1, $2, 5, $3) ON CONFLICT (name) DO UPDATE"
            " SET last_stream_id = $2",
            keys.events,
            future,
            b"\0" * 32,
        )
    assert await continue_stream(redis, pool, keys) == future
    appended = text(await redis.xadd(keys.events, {"event": b"{}"}))
    assert stream_id_key(appended) > stream_id_key(future)
    assert await continue_stream(redis, pool, keys) is None  # once is enough
