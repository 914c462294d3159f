"""The projector's parts alone: committing a batch, leadership, reading through the group."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from plugind.bus.codec import text
from plugind.bus.keys import PROJECTOR_GROUP, Keys
from plugind.messages import EventFactory, TaskResult, TaskStarted, TaskSucceeded, encode
from plugind.projections._entries import LogEntry, decode_entry
from plugind.projections.batch_reader import BatchReader
from plugind.projections.commit import ProjectionConflictError, commit_batch
from plugind.projections.hashchain import verify_event_log
from plugind.projections.leader import LeaderLock, lock_is_held, projector_lock_key
from plugind.projections.queries import get_checkpoint, get_task

pytestmark = pytest.mark.anyio
ev = EventFactory("test-node")
CHECKPOINT = "event_log"


def started(rid: str, attempt: int = 1) -> TaskStarted:
    return ev(
        TaskStarted,
        request_id=rid,
        tenant_id="t1",
        plugin_id="acme/calc",
        identifier="acme/calc:0.1.0@abc",
        access="tool",
        action="invoke_tool",
        attempt=attempt,
    )


def succeeded(rid: str) -> TaskSucceeded:
    return ev(
        TaskSucceeded,
        request_id=rid,
        tenant_id="t1",
        plugin_id="acme/calc",
        result=TaskResult(chunks=[]),
        duration_ms=1.0,
    )


def batch(*events: TaskStarted | TaskSucceeded, first: int = 1) -> list[LogEntry]:
    """Entries as the reader hands them over, at stream ids ``first-0``, ``first+1-0``, …"""
    return [decode_entry(f"{first + i}-0", {b"event": encode(e)}) for i, e in enumerate(events)]


async def log_ids(pool: asyncpg.Pool) -> list[str]:
    return [
        r["stream_id"]
        for r in await pool.fetch("SELECT stream_id FROM event_log ORDER BY position")
    ]


# -- committing ------------------------------------------------------------------------------


async def test_committing_a_batch_twice_changes_nothing(pool: asyncpg.Pool, keys: Keys) -> None:
    first = batch(started("r1"), succeeded("r1"), started("r2"))
    async with pool.acquire() as conn:
        assert await commit_batch(conn, first, keys=keys, checkpoint=CHECKPOINT) == 3
        before = await get_checkpoint(conn)
        assert await commit_batch(conn, first, keys=keys, checkpoint=CHECKPOINT) == 0
        assert await get_checkpoint(conn) == before

        # A retry that overlaps what is committed (a re-read after a failed ack) adds only the rest.
        overlap = first[1:] + batch(succeeded("r2"), first=4)
        assert await commit_batch(conn, overlap, keys=keys, checkpoint=CHECKPOINT) == 1
        assert (await verify_event_log(conn)).ok
    assert await log_ids(pool) == ["1-0", "2-0", "3-0", "4-0"]
    task = await get_task(pool, "r2")
    assert task is not None and task.status == "succeeded" and task.attempts == 1


async def test_the_same_event_under_two_stream_ids_is_logged_once(
    pool: asyncpg.Pool, keys: Keys
) -> None:
    event = started("r1")
    async with pool.acquire() as conn:
        assert await commit_batch(conn, batch(event), keys=keys, checkpoint=CHECKPOINT) == 1
        again = batch(event, started("r2"), first=2)
        assert await commit_batch(conn, again, keys=keys, checkpoint=CHECKPOINT) == 1
        checkpoint = await get_checkpoint(conn)
    assert checkpoint is not None and checkpoint.last_stream_id == "3-0"
    assert checkpoint.last_position == 2
    assert await log_ids(pool) == ["1-0", "3-0"]


async def test_isolated_commit_skips_only_the_poisonous_change(
    pool: asyncpg.Pool, keys: Keys
) -> None:
    # attempt does not fit the tasks.attempts integer column: its read-model update always fails
    poisoned = batch(started("r1", attempt=2**40), started("r2"))
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError):
            await commit_batch(conn, poisoned, keys=keys, checkpoint=CHECKPOINT)
        assert await log_ids(pool) == []  # the batch rolled back as a whole
        assert (
            await commit_batch(conn, poisoned, keys=keys, checkpoint=CHECKPOINT, isolate=True) == 2
        )
    assert await log_ids(pool) == ["1-0", "2-0"]
    assert await get_task(pool, "r1") is None
    assert await get_task(pool, "r2") is not None


async def test_a_database_following_another_namespace_is_refused(
    pool: asyncpg.Pool, keys: Keys
) -> None:
    async with pool.acquire() as conn:
        await commit_batch(conn, batch(started("r1")), keys=keys, checkpoint=CHECKPOINT)
        with pytest.raises(ProjectionConflictError, match="one database per namespace"):
            await commit_batch(
                conn, batch(started("r2"), first=2), keys=Keys("other"), checkpoint=CHECKPOINT
            )


# -- leadership ------------------------------------------------------------------------------


async def test_leadership_passes_to_the_next_node_on_release(
    pool: asyncpg.Pool, keys: Keys
) -> None:
    key = projector_lock_key(keys)
    a, b = LeaderLock(pool, key), LeaderLock(pool, key)
    try:
        assert not await lock_is_held(pool, key)
        assert await a.try_acquire() and a.held
        assert await a.try_acquire()  # holding it already is not a failure
        assert not await b.try_acquire() and not b.held
        assert await lock_is_held(pool, key)
        with pytest.raises(RuntimeError):
            _ = b.connection

        await a.release()
        assert not a.held
        await a.release()  # twice is harmless
        assert await b.try_acquire()
        assert not await a.try_acquire()
        other = LeaderLock(pool, projector_lock_key(Keys("other")))
        assert await other.try_acquire()  # another namespace's lock is another lock
        await other.release()
    finally:
        await a.release()
        await b.release()
    assert not await lock_is_held(pool, key)


async def test_a_killed_leader_session_frees_the_lock_and_releases_quietly(
    pool: asyncpg.Pool, keys: Keys, database_url: str
) -> None:
    key = projector_lock_key(keys)
    leader, standby = LeaderLock(pool, key), LeaderLock(pool, key)
    assert await leader.try_acquire()
    pid = await leader.connection.fetchval("SELECT pg_backend_pid()")
    admin = await asyncpg.connect(database_url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()

    assert await standby.try_acquire()  # the lock died with the session
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
        await leader.connection.fetchval("SELECT 1")
    await leader.release()  # on a dead, detached connection: no error
    assert not leader.held
    await standby.release()
    assert await pool.fetchval("SELECT 1") == 1  # the pool is whole again


# -- reading ---------------------------------------------------------------------------------


async def publish(redis: aioredis.Redis, keys: Keys, *events: TaskStarted) -> list[str]:
    return [text(await redis.xadd(keys.events, {"event": encode(e)})) for e in events]


async def test_the_reader_rereads_its_pending_batch_until_acknowledged(
    redis: aioredis.Redis, keys: Keys
) -> None:
    reader = BatchReader(redis, keys, "node-a", block_ms=10)
    await reader.take_over()
    ids = await publish(redis, keys, started("r1"), started("r2"))
    first = await reader.read()
    assert [e.stream_id for e in first] == ids
    assert [e.request_id for e in first] == ["r1", "r2"]
    assert await reader.read() == []  # nothing new

    reader.reread()  # the commit failed: the same batch again
    assert [e.stream_id for e in await reader.read()] == ids
    await reader.ack(first)
    reader.reread()
    assert await reader.read() == []


async def test_a_new_leaders_reader_takes_over_what_the_old_one_left_pending(
    redis: aioredis.Redis, keys: Keys
) -> None:
    old = BatchReader(redis, keys, "node-a", block_ms=10)
    await old.take_over()
    ids = await publish(redis, keys, started("r1"), started("r2"))
    assert len(await old.read()) == 2  # ... and node-a dies before committing

    new = BatchReader(redis, keys, "node-b", block_ms=10)
    await new.take_over()
    assert [e.stream_id for e in await new.read()] == ids
    pending: list[dict[str, Any]] = await redis.xpending_range(
        keys.events, PROJECTOR_GROUP, "-", "+", 10
    )
    assert {text(p["consumer"]) for p in pending} == {"node-b"}


async def test_the_reader_recreates_a_deleted_group_and_decodes_garbage(
    redis: aioredis.Redis, keys: Keys
) -> None:
    reader = BatchReader(redis, keys, "node-a", block_ms=10)
    await reader.take_over()
    await redis.xgroup_destroy(keys.events, PROJECTOR_GROUP)
    assert await reader.read() == []  # NOGROUP: recreated from the stream's start
    await redis.xadd(keys.events, {"event": b"not json"})
    [entry] = await reader.read()
    assert entry.type == "unknown" and entry.event is None
