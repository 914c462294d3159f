"""The content-addressed package store: insert-if-absent, lookups, and refusing wrong digests."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from plugind.errors import PlugindError
from plugind.projections.migrate import migrate
from plugind.projections.package_store import get_package, get_package_by_identifier, put_package

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await migrate(conn)
    yield pool
    await pool.close()


async def test_round_trip(pool: asyncpg.Pool) -> None:
    data = b"PK\x03\x04 not really a zip \x00\xff" * 100
    sha = hashlib.sha256(data).hexdigest()
    declaration: dict[Any, Any] = {
        "author": "acme",
        "name": "calc",
        "tools": [{"name": "add"}],
        1: "int key (YAML allows it)",
    }
    identifier = f"acme/calc:0.1.0@{sha}"

    assert await put_package(
        pool, sha256=sha, identifier=identifier, declaration=declaration, data=data
    )
    assert not await put_package(
        pool, sha256=sha.upper(), identifier=identifier, declaration=declaration, data=data
    )

    stored = await get_package(pool, sha)
    assert stored is not None
    assert (stored.sha256, stored.identifier, stored.size, stored.data) == (
        sha,
        identifier,
        len(data),
        data,
    )
    assert stored.declaration["tools"] == [{"name": "add"}]
    async with pool.acquire() as conn:
        by_id = await get_package_by_identifier(conn, identifier)
    assert by_id == stored
    assert await get_package(pool, "0" * 64) is None
    assert await get_package_by_identifier(pool, "acme/calc:9.9.9@x") is None


async def test_refuses_bytes_under_another_digest(pool: asyncpg.Pool) -> None:
    with pytest.raises(PlugindError) as info:
        await put_package(pool, sha256="0" * 64, identifier="a/b:1@c", declaration={}, data=b"data")
    assert info.value.code == "checksum_mismatch"
    assert await get_package(pool, "0" * 64) is None
