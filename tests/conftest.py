"""Real services for the tests, each test isolated in its own namespace and database.

Service choice, in order: ``PLUGIND_TEST_REDIS_URL`` / ``PLUGIND_TEST_DATABASE_URL``; the local
Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, user postgres) when they answer; else the
embedded Valkey and Postgres, started once per session under a temporary folder
(``PLUGIND_TEST_EMBEDDED=1`` forces those, to exercise that fallback).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from plugind.bus.keys import Keys

pytest_plugins = ["e2e"]

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
# PLUGIND_TEST_EMBEDDED=1 skips the local services, to exercise the embedded fallback
FORCE_EMBEDDED = os.environ.get("PLUGIND_TEST_EMBEDDED") == "1"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def _embedded_root() -> Iterator[Path]:
    # Not under pytest's tmp root: that one is reset to 0700 per session, which the unprivileged
    # user the embedded Postgres runs as (when we are root) cannot enter.
    root = Path(tempfile.mkdtemp(prefix="plugind-embedded-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(_embedded_root: Path) -> Iterator[str]:
    explicit = os.environ.get("PLUGIND_TEST_REDIS_URL")
    if explicit:
        yield explicit
        return
    if _reachable("127.0.0.1", 6379) and not FORCE_EMBEDDED:
        yield LOCAL_REDIS
        return
    from plugind.embedded import start_embedded_redis

    server = start_embedded_redis(_embedded_root / "valkey")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def admin_database_url(_embedded_root: Path) -> Iterator[str]:
    """A URL with the right to CREATE DATABASE; tests never write to it directly."""
    explicit = os.environ.get("PLUGIND_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    if _reachable("127.0.0.1", 5432) and not FORCE_EMBEDDED:
        yield LOCAL_POSTGRES
        return
    from plugind.embedded import start_embedded_postgres

    server = start_embedded_postgres(_embedded_root / "postgres")
    try:
        yield server.url
    finally:
        server.stop()


def _with_database(url: str, database: str) -> str:
    base, _, _query = url.partition("?")
    head, _, _old = base.rpartition("/")
    return f"{head}/{database}"


@pytest.fixture
async def database_url(admin_database_url: str) -> AsyncIterator[str]:
    """A fresh, empty database of this test's own, dropped afterwards."""
    name = f"plugind_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(admin_database_url, name)
    admin = await asyncpg.connect(admin_database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
async def redis(redis_url: str, keys: Keys) -> AsyncIterator[aioredis.Redis]:
    """A client on the test Redis; every key of the test's namespace is deleted afterwards."""
    client: aioredis.Redis = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        pattern = keys.tag.replace("{", "\\{").replace("}", "\\}") + ":*"
        batch: list[Any] = []
        async for key in client.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                await client.delete(*batch)
                batch.clear()
        if batch:
            await client.delete(*batch)
        await client.aclose()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool on this test's database, migrated, in plugind's schema as the daemon's."""
    from plugind.projections._db import DEFAULT_SCHEMA, create_pool
    from plugind.projections.migrate import migrate

    pool = await create_pool(database_url, min_size=1, max_size=6)
    async with pool.acquire() as conn:
        await migrate(conn, schema=DEFAULT_SCHEMA)
    yield pool
    await pool.close()


@pytest.fixture
async def projector(redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys) -> AsyncIterator[Any]:
    """A projector on this test's namespace and database (tests drive it with ``run_once``)."""
    from plugind.projections.projector import Projector

    p = Projector(redis, pool, keys, "node-a", block_ms=50)
    yield p
    await p.close()
