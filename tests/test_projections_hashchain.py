"""The hash chain: definition, verification, and that tampering with the log is detected."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from plugind.bus.keys import Keys
from plugind.messages import EventFactory, InstallStarted, encode
from plugind.projections.hashchain import (
    GENESIS,
    ChainRow,
    canonical,
    chain_hash,
    verify_chain,
    verify_event_log,
)
from plugind.projections.migrate import migrate
from plugind.projections.projector import Projector

ev = EventFactory("test-node")


def test_chain_hash_is_sha256_of_previous_and_sorted_compact_json() -> None:
    assert bytes(32) == GENESIS
    spaced = b'{ "b": 1, "a": {"d": [1, 2], "c": "x"} }'
    assert canonical(spaced) == b'{"a":{"c":"x","d":[1,2]},"b":1}'
    expected = hashlib.sha256(GENESIS + b'{"a":1,"b":2}').digest()
    assert chain_hash(GENESIS, '{"b": 2, "a": 1}') == expected
    with pytest.raises(ValueError, match="32 bytes"):
        chain_hash(b"short", "{}")


def _chain(payloads: list[str]) -> list[ChainRow]:
    rows, head = [], GENESIS
    for position, payload in enumerate(payloads, start=1):
        head = chain_hash(head, payload)
        rows.append(ChainRow(position, payload, head))
    return rows


def test_verify_chain_finds_the_first_bad_row() -> None:
    rows = _chain(['{"n": 1}', '{"n": 2}', '{"n": 3}'])
    result = verify_chain(rows)
    assert (result.ok, result.checked, result.head_position) == (True, 3, 3)
    assert result.head_hash == rows[-1].hash

    edited = [rows[0], rows[1]._replace(payload='{"n": 20}'), rows[2]]
    bad = verify_chain(edited)
    assert (bad.ok, bad.bad_position, bad.checked) == (False, 2, 1)
    assert "hash mismatch" in (bad.reason or "")

    gap = verify_chain([rows[0], rows[2]])
    assert (gap.ok, gap.bad_position) == (False, 3)
    assert "gap" in (gap.reason or "")

    resumed = verify_chain(rows[1:], prev_hash=rows[0].hash, prev_position=1)
    assert resumed.ok and resumed.checked == 2


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    yield pool
    await pool.close()


@pytest.mark.anyio
async def test_tampering_with_the_event_log_is_detected(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    for i in range(5):
        event = ev(InstallStarted, request_id=f"r{i}", tenant_id="t", source="path:x")
        await redis.xadd(keys.events, {"event": encode(event)})
    projector = Projector(redis, pool, keys, "node-a", block_ms=10)
    try:
        assert await projector.run_once() == 5
    finally:
        await projector.close()
    async with pool.acquire() as conn:
        good = await verify_event_log(conn, batch_size=2)  # several batches
        assert good.ok and good.checked == 5

        await conn.execute(
            "UPDATE event_log SET payload = jsonb_set(payload, '{source}', '\"path:y\"')"
            " WHERE position = 3"
        )
        edited = await verify_event_log(conn, batch_size=2)
        assert (edited.ok, edited.bad_position) == (False, 3)

        await conn.execute(
            "UPDATE event_log SET payload = jsonb_set(payload, '{source}', '\"path:x\"')"
            " WHERE position = 3"
        )
        assert (await verify_event_log(conn)).ok
        await conn.execute("DELETE FROM event_log WHERE position = 5")
        truncated = await verify_event_log(conn)
        assert not truncated.ok and "checkpoint" in (truncated.reason or "")
