"""plugind's tables live in their own Postgres schema, so it can share Dify's ``dify_plugin``.

The upstream daemon keeps ``plugins``, ``plugin_installations``, ``install_tasks``... in
``public`` of that database. A daemon pointed at such a database (through Dify's own ``DB_*``
settings) migrates into schema ``plugind``, installs and lists plugins, and leaves upstream's
tables as they were; the CLI finds its tables too. A database where an older plugind kept its
tables in ``public`` has them moved, event log included.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
from e2e import EXAMPLE_CALC

from plugind.client import Client
from plugind.config import Settings, load_settings
from plugind.daemon import running_daemon
from plugind.messages import EventFactory, Installed, ManifestSummary, TaskSucceeded, encode
from plugind.package.difypkg import build_package
from plugind.projections._db import connect
from plugind.projections.migrate import migrate

pytestmark = pytest.mark.anyio

UPSTREAM_TABLES = """
CREATE TABLE plugins (id uuid PRIMARY KEY, plugin_unique_identifier varchar(255),
                      plugin_id varchar(255), refers integer DEFAULT 0);
CREATE TABLE plugin_installations (id uuid PRIMARY KEY, tenant_id uuid, plugin_id varchar(255),
                                   plugin_unique_identifier varchar(255), source varchar(63));
CREATE TABLE plugin_declarations (id uuid PRIMARY KEY, plugin_unique_identifier varchar(255),
                                  declaration text);
CREATE TABLE install_tasks (id uuid PRIMARY KEY, status varchar(50), tenant_id uuid,
                            total_plugins integer, completed_plugins integer, plugins text);
CREATE TABLE tasks (id uuid PRIMARY KEY, note text);
CREATE TABLE endpoints (id uuid PRIMARY KEY, hook_id varchar(127));
CREATE TABLE tenant_storages (id uuid PRIMARY KEY, size bigint);
INSERT INTO plugins VALUES ('00000000-0000-0000-0000-000000000001', 'langgenius/x:1.0.0@ab',
                            'langgenius/x', 1);
INSERT INTO install_tasks VALUES ('00000000-0000-0000-0000-000000000002', 'success',
                                  '00000000-0000-0000-0000-000000000003', 1, 1, '[]');
"""


@pytest.fixture
async def dify_plugin_db(database_url: str) -> AsyncIterator[str]:
    """A database that already holds the upstream daemon's tables in ``public``."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(UPSTREAM_TABLES)
    finally:
        await conn.close()
    yield database_url


async def _public_snapshot(url: str) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "ORDER BY table_name"
        )
        return [
            (
                t["table_name"],
                await conn.fetchval(f'SELECT count(*) FROM public."{t["table_name"]}"'),
            )
            for t in tables
        ]
    finally:
        await conn.close()


async def test_a_daemon_on_difys_database_keeps_to_its_schema(
    dify_plugin_db: str, redis_url: str, namespace: str, shared_plugin_dir: Path, redis: object
) -> None:
    before = await _public_snapshot(dify_plugin_db)
    parts = urlsplit(dify_plugin_db)
    # configured the way Dify's compose file configures its daemon
    dify_env = {
        "DB_HOST": parts.hostname or "127.0.0.1",
        "DB_PORT": str(parts.port or 5432),
        "DB_USERNAME": parts.username or "postgres",
        "DB_PASSWORD": parts.password or "",
        "DB_DATABASE": parts.path.lstrip("/"),
        "DB_SSL_MODE": "disable",
        "REDIS_URL": redis_url,
        "PLUGIND_NAMESPACE": namespace,
        "SERVER_KEY": "k",
        "SERVER_PORT": "0",
        "PLUGIN_REMOTE_INSTALLING_PORT": "0",
        "PLUGIND_HTTP_HOST": "127.0.0.1",
        "PLUGIN_WORKING_PATH": str(shared_plugin_dir),
    }
    settings = load_settings(dify_env)
    assert settings.database_url is not None and settings.database_url.endswith("sslmode=disable")
    async with running_daemon(settings, shutdown_grace_s=5) as daemon:
        assert daemon.redis is not None
        client = Client(daemon.redis, daemon.keys)
        installed = await client.wait(await client.install(build_package(EXAMPLE_CALC)), 300)
        assert isinstance(installed, Installed), installed
        rid = await client.invoke_tool("acme/calc", "calc", "add", {"a": 1, "b": 2})
        assert isinstance(await client.wait(rid, 60), TaskSucceeded)

    assert await _public_snapshot(dify_plugin_db) == before  # upstream's tables untouched
    conn = await connect(settings.database_url)
    try:
        ours = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'plugind'"
        )
        assert {"event_log", "plugins", "tasks", "packages"} <= {r["table_name"] for r in ours}
        assert await conn.fetchval("SELECT status FROM plugins") == "installed"
        assert await conn.fetchval("SELECT status FROM tasks WHERE request_id = $1", rid) == (
            "succeeded"
        )
    finally:
        await conn.close()

    # the CLI reads the same schema (it sets search_path on its own connections)
    inherited = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env = {**inherited, **dify_env}
    result = await anyio.run_process(
        [sys.executable, "-m", "plugind.cli", "events", "--type", "task.succeeded", "--json"],
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert rid in result.stdout.decode()


async def test_tables_of_an_older_plugind_move_into_the_schema(database_url: str) -> None:
    bare = await asyncpg.connect(database_url)
    try:
        await migrate(bare)  # as before the schema move: into public
        event = EventFactory("n")(
            Installed,
            request_id="r-old",
            tenant_id="t",
            plugin_id="acme/calc",
            identifier="acme/calc:0.1.0@" + "a" * 64,
            version="0.1.0",
            checksum="a" * 64,
            manifest=ManifestSummary(),
            duration_ms=1,
        )
        await bare.execute(
            "INSERT INTO event_log (position, stream_id, event_id, type, request_id, tenant_id, "
            "at, payload, hash) VALUES (1, '1-0', $1, 'plugin.installed', 'r-old', 't', now(), "
            "$2::text::jsonb, $3)",
            event.event_id,
            encode(event).decode(),
            b"\0" * 32,
        )
    finally:
        await bare.close()

    conn = await connect(database_url)
    try:
        assert await migrate(conn, schema="plugind") == []  # moved, not created again
        assert await conn.fetchval("SELECT request_id FROM event_log") == "r-old"
        left = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert left == 0
        assert await conn.fetchval("SELECT count(*) FROM dify_install_tasks") == 0
    finally:
        await conn.close()


async def test_settings_schema_is_used_everywhere(database_url: str) -> None:
    settings = Settings(database_url=database_url, db_schema="plugind_two")
    conn = await connect(database_url, schema=settings.db_schema)
    try:
        await migrate(conn, schema=settings.db_schema)
        assert await conn.fetchval("SELECT current_schema()") == "plugind_two"
        assert await conn.fetchval("SELECT to_regclass('plugind_two.event_log') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('public.event_log')") is None
    finally:
        await conn.close()


async def test_a_missing_database_is_created(admin_database_url: str) -> None:
    """A fresh Dify has no ``dify_plugin`` yet: the daemon creates it, as upstream does."""
    from plugind.daemon import _connect_postgres

    name = f"plugind_test_{uuid.uuid4().hex[:12]}"
    url = admin_database_url.partition("?")[0].rpartition("/")[0] + f"/{name}"
    pool = await _connect_postgres(url, 5.0, "plugind")
    try:
        assert await pool.fetchval("SELECT current_database()") == name
    finally:
        await pool.close()
        admin = await asyncpg.connect(admin_database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
