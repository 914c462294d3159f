"""Migrations: applied once, in order, idempotently, even when several daemons start together."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from plugind.projections.migrate import available_migrations, migrate

pytestmark = pytest.mark.anyio

TABLES = {"event_log", "packages", "plugins", "tasks", "projection_checkpoints"}


async def test_migrate_applies_every_version_once(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        versions = [m.version for m in available_migrations()]
        assert versions[0] == "001"
        assert await migrate(conn) == versions
        assert await migrate(conn) == []
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert TABLES | {"schema_migrations"} <= tables
        recorded = [
            r["version"]
            for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        ]
        assert recorded == versions
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_once(database_url: str) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(3)]
    results: list[list[str]] = []

    async def run(conn: asyncpg.Connection) -> None:
        results.append(await migrate(conn))

    try:
        async with anyio.create_task_group() as tg:
            for conn in conns:
                tg.start_soon(run, conn)
    finally:
        for conn in conns:
            await conn.close()
    applied = [r for r in results if r]
    assert len(applied) == 1, results
    assert applied[0] == [m.version for m in available_migrations()]
