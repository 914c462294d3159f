"""The projector's batch paths give what the one-by-one paths give.

- ``apply_events`` (set-based statements, a task's started+ended pair written as one row) leaves
  the read models exactly as ``apply_event`` applied to each event in turn, from any start;
- the hash of an event whose canonical form is computed without Postgres equals the hash of
  what Postgres hands back for the stored jsonb;
- a batch with duplicates (logged before, or twice in the batch) logs each event once, with
  gap-free positions and a chain that verifies.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import orjson
import pytest

from plugind.bus.keys import Keys
from plugind.messages import (
    AnyEvent,
    CommandDeadLettered,
    CommandRejected,
    ErrorInfo,
    EventFactory,
    Installed,
    ManifestSummary,
    TaskFailed,
    TaskResult,
    TaskStarted,
    TaskSucceeded,
    TaskTimedOut,
    Uninstalled,
    encode,
)
from plugind.projections._entries import decode_entry, jsonb_canonical
from plugind.projections.commit import commit_batch
from plugind.projections.hashchain import canonical, verify_event_log
from plugind.projections.projector import Projector
from plugind.projections.queries import get_checkpoint
from plugind.projections.read_models import apply_event, apply_events

pytestmark = pytest.mark.anyio

KEYS = Keys("batching")
REQUESTS = ("r1", "r2", "r3", "r4")
PLUGINS = ("acme/calc", "acme/other")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _random_event(rng: random.Random, make: EventFactory) -> AnyEvent:
    rid = rng.choice(REQUESTS)
    tenant = rng.choice(("t1", "t2"))
    plugin = rng.choice(PLUGINS)
    identifier = f"{plugin}:0.{rng.randint(1, 3)}.0@abc"
    ref = rng.choice((plugin, identifier))
    error = ErrorInfo(code="plugin_error", message=rng.choice(("boom", "bang")))
    kind = rng.randrange(10)
    if kind < 3:
        return make(
            TaskStarted,
            request_id=rid,
            tenant_id=tenant,
            plugin_id=plugin,
            identifier=identifier,
            access="tool",
            action=rng.choice(("invoke_tool", "validate")),
            attempt=rng.randint(1, 4),
        )
    if kind < 5:
        return make(
            TaskSucceeded,
            request_id=rid,
            tenant_id=tenant,
            plugin_id=ref,
            result=TaskResult(chunks=[{"n": rng.randint(0, 9)}]),
            duration_ms=rng.choice((0.5, 1.25, 3.0)),
        )
    if kind == 5:
        return make(
            TaskFailed, request_id=rid, tenant_id=tenant, plugin_id=ref, error=error, duration_ms=2
        )
    if kind == 6:
        return make(
            TaskTimedOut,
            request_id=rid,
            tenant_id=tenant,
            plugin_id=ref,
            timeout_s=1.0,
            duration_ms=1000.0,
        )
    if kind == 7:
        stream = rng.choice((KEYS.tasks, KEYS.install))
        if rng.random() < 0.5:
            return make(
                CommandRejected,
                request_id=rid,
                tenant_id=tenant,
                stream=stream,
                entry_id="1-0",
                error=error,
                raw="{}",
            )
        return make(
            CommandDeadLettered,
            request_id=rid,
            tenant_id=tenant,
            stream=stream,
            entry_id="1-0",
            deliveries=5,
            error=error,
        )
    if kind == 8:
        return make(
            Installed,
            request_id=rid,
            tenant_id=tenant,
            plugin_id=plugin,
            identifier=identifier,
            version="0.1.0",
            checksum="abc",
            manifest=ManifestSummary(author="acme"),
            duration_ms=1.0,
        )
    return make(
        Uninstalled, request_id=rid, tenant_id=tenant, plugin_id=plugin, identifier=identifier
    )


def _timed(rng: random.Random, events: list[AnyEvent]) -> list[tuple[AnyEvent, datetime]]:
    return [(e, T0 + timedelta(milliseconds=rng.randint(0, 10_000))) for e in events]


async def _snapshot(conn: Any) -> tuple[list[Any], list[Any]]:
    tasks = await conn.fetch("SELECT * FROM tasks ORDER BY request_id")
    plugins = await conn.fetch("SELECT * FROM plugins ORDER BY tenant_id, plugin_id")
    return [dict(r) for r in tasks], [dict(r) for r in plugins]


async def test_batched_fold_equals_folding_one_by_one(pool: asyncpg.Pool) -> None:
    rng = random.Random(8)
    make = EventFactory("n")
    async with pool.acquire() as conn:
        for _case in range(150):
            before = _timed(rng, [_random_event(rng, make) for _ in range(rng.randint(0, 6))])
            batch = _timed(rng, [_random_event(rng, make) for _ in range(rng.randint(1, 12))])
            # the same batch again now and then: duplicates are applied (the log skips them)
            if rng.random() < 0.2:
                batch += batch[: rng.randint(1, len(batch))]
            tx = conn.transaction()
            await tx.start()
            try:
                for event, at in before:  # some rows exist before the batch, some do not
                    await apply_event(conn, event, at=at, tasks_stream=KEYS.tasks)
                savepoint = conn.transaction()  # the state both ways start from
                await savepoint.start()
                await apply_events(conn, batch, tasks_stream=KEYS.tasks)
                batched = await _snapshot(conn)
                await savepoint.rollback()
                for event, at in batch:
                    await apply_event(conn, event, at=at, tasks_stream=KEYS.tasks)
                one_by_one = await _snapshot(conn)
            finally:
                await tx.rollback()
            assert batched == one_by_one, (before, batch)


async def test_a_task_started_and_ended_in_one_batch_is_written_once(pool: asyncpg.Pool) -> None:
    make = EventFactory("n")
    started = make(
        TaskStarted,
        request_id="r1",
        tenant_id="t1",
        plugin_id="acme/calc",
        identifier="acme/calc:0.1.0@abc",
        access="tool",
        action="invoke_tool",
        attempt=2,
    )
    ended = make(
        TaskSucceeded,
        request_id="r1",
        tenant_id="t1",
        plugin_id="acme/calc:0.1.0@abc",
        result=TaskResult(chunks=[1]),
        duration_ms=1.5,
    )
    async with pool.acquire() as conn, conn.transaction():
        await apply_events(conn, [(started, T0), (ended, T0 + timedelta(seconds=1))])
        stats = await conn.fetchrow(
            "SELECT n_tup_ins, n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'tasks'"
        )
        row = await conn.fetchrow("SELECT * FROM tasks WHERE request_id = 'r1'")
    assert stats is not None and (stats["n_tup_ins"], stats["n_tup_upd"]) == (1, 0)
    assert row is not None
    assert (row["status"], row["attempts"], row["access"], row["identifier"]) == (
        "succeeded",
        2,
        "tool",
        "acme/calc:0.1.0@abc",
    )
    assert (row["created_at"], row["started_at"], row["finished_at"]) == (
        T0,
        T0,
        T0 + timedelta(seconds=1),
    )


DOCUMENTS: list[Any] = [
    {"a": 1, "b": [1.5, -2, 0.1, 1e15, 123456789.123, 1e-05, 18446744073709551615]},
    {"z": 'é\n\x01\u2028/<>"\\', "y": {"nested": [None, True, False, {}]}, "": ""},
    {"big": 1e16, "small": 1.5e-7, "neg": -0.0, "int_neg_zero": 0},
    {"k": "1e5", "s": ":1e5", "t": "[-0.0]"},  # lookalikes inside strings
    {"f": 2.5e300, "g": -1.7976931348623157e308},
    [1, 2, 3, {"b": 1, "a": 2}],
]

RAW_DOCUMENTS: list[bytes] = [
    b'{"a":1e2}',
    b'{"a":1.5E-3,"b":2}',
    b'{"a": 1}',
    b'{"a":1,"a":2}',
    b'{"a":-0.0}',
    b'{"a":1.50}',
    b'{"a":"\\u00e9"}',
    b'{"a":[-0,0.0,10]}',
]


async def test_canonical_form_without_postgres_matches_postgres(pool: asyncpg.Pool) -> None:
    raws = [orjson.dumps(d) for d in DOCUMENTS] + RAW_DOCUMENTS
    rng = random.Random(3)
    for _ in range(300):  # random documents with awkward numbers and strings
        doc = {
            f"k{i}": rng.choice(
                [
                    rng.uniform(-1e20, 1e20),
                    rng.random() * 10 ** rng.randint(-12, 20),
                    rng.randint(-(2**63), 2**63 - 1),
                    rng.choice(["x", "1e5", "é", "\t", ":-0.0,"]),
                    -0.0,
                    [rng.random(), {"n": rng.randint(0, 9)}],
                ]
            )
            for i in range(rng.randint(1, 5))
        }
        raws.append(orjson.dumps(doc))
    fast = 0
    async with pool.acquire() as conn:
        for raw in raws:
            mine = jsonb_canonical(raw, orjson.loads(raw))
            theirs = canonical(await conn.fetchval("SELECT $1::jsonb::text", raw.decode()))
            if mine is not None:
                fast += 1
                assert mine == theirs, raw
    assert fast > 50
    # what plugind's events hold takes the fast path; exponents and negative zeros do not
    assert all(jsonb_canonical(raw, orjson.loads(raw)) is not None for raw in raws[:2])
    assert jsonb_canonical(raws[2], orjson.loads(raws[2])) is None


def _entries(events: list[AnyEvent], first: int = 1) -> list[Any]:
    return [decode_entry(f"{first + i}-0", {b"event": encode(e)}) for i, e in enumerate(events)]


async def test_duplicates_in_and_before_a_batch_are_logged_once(pool: asyncpg.Pool) -> None:
    make = EventFactory("n")

    def started(rid: str) -> TaskStarted:
        return make(
            TaskStarted,
            request_id=rid,
            tenant_id="t1",
            plugin_id="acme/calc",
            identifier="acme/calc:0.1.0@abc",
            access="tool",
            action="invoke_tool",
            attempt=1,
        )

    a, b, c = started("ra"), started("rb"), started("rc")
    async with pool.acquire() as conn:
        assert await commit_batch(conn, _entries([a]), keys=KEYS, checkpoint="event_log") == 1
        # a: logged before; b twice in the batch; c once; an entry that is not an event
        batch = [*_entries([b, a, b, c], first=2), decode_entry("6-0", {b"x": b"y"})]
        assert await commit_batch(conn, batch, keys=KEYS, checkpoint="event_log") == 3
        rows = await conn.fetch("SELECT position, stream_id, event_id FROM event_log ORDER BY 1")
        checkpoint = await get_checkpoint(conn)
        assert (await verify_event_log(conn)).ok
        tasks = await conn.fetchval("SELECT count(*) FROM tasks")
    assert [(r["position"], r["stream_id"]) for r in rows] == [
        (1, "1-0"),
        (2, "2-0"),
        (3, "5-0"),
        (4, "6-0"),
    ]
    assert [r["event_id"] for r in rows[:3]] == [a.event_id, b.event_id, c.event_id]
    assert checkpoint is not None
    assert (checkpoint.last_stream_id, checkpoint.last_position) == ("6-0", 4)
    assert tasks == 3


# -- the projector's loop: reading ahead behind a backlog, lingering when caught up ----------


async def _publish_tasks(redis: Any, keys: Keys, n: int) -> list[str]:
    make = EventFactory("n")
    ids: list[str] = []
    for i in range(n):
        event = make(
            TaskStarted,
            request_id=f"r{i}",
            tenant_id="t1",
            plugin_id="acme/calc",
            identifier="acme/calc:0.1.0@abc",
            access="tool",
            action="invoke_tool",
            attempt=1,
        )
        ids.append((await redis.xadd(keys.events, {"event": encode(event)})).decode())
    return ids


async def committed_through(pool: asyncpg.Pool, entry_id: str, *, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while True:
            checkpoint = await get_checkpoint(pool)
            if checkpoint is not None and checkpoint.last_stream_id == entry_id:
                return
            await anyio.sleep(0.01)


class Spy:
    """Wraps a projector's reads and commits to see when each ran."""

    def __init__(self, projector: Projector) -> None:
        self.commits = 0
        self.committing = False
        self.reads_while_committing = 0
        read, commit = projector.reader.read, projector.commit

        async def spied_read() -> Any:
            if self.committing:
                self.reads_while_committing += 1
            return await read()

        async def spied_commit(batch: Any) -> int:
            self.committing = True
            try:
                await anyio.sleep(0.02)  # a slow database: room to read meanwhile
                return await commit(batch)
            finally:
                self.committing = False
                self.commits += 1

        projector.reader.read = spied_read  # type: ignore[method-assign]
        projector.commit = spied_commit  # type: ignore[method-assign]


async def test_behind_a_backlog_the_next_batch_is_read_while_one_commits(
    redis: Any, pool: asyncpg.Pool, keys: Keys
) -> None:
    ids = await _publish_tasks(redis, keys, 60)
    projector = Projector(redis, pool, keys, "node-a", batch_size=10, block_ms=20, linger_s=0)
    spy = Spy(projector)
    async with anyio.create_task_group() as tg:
        tg.start_soon(projector.run)
        await committed_through(pool, ids[-1], timeout=20)
        tg.cancel_scope.cancel()
    await projector.close()
    assert spy.reads_while_committing >= 3
    async with pool.acquire() as conn:
        logged = [r["stream_id"] for r in await conn.fetch("SELECT stream_id FROM event_log")]
        assert (await verify_event_log(conn)).ok
    assert logged == ids  # in stream order, every one once


async def test_caught_up_it_lingers_so_a_trickle_is_committed_in_few_batches(
    redis: Any, pool: asyncpg.Pool, keys: Keys
) -> None:
    projector = Projector(redis, pool, keys, "node-a", block_ms=20, linger_s=0.25)
    spy = Spy(projector)
    async with anyio.create_task_group() as tg:
        tg.start_soon(projector.run)
        ids: list[str] = []
        for _ in range(20):  # one event every 25 ms for half a second
            ids += await _publish_tasks(redis, keys, 1)
            await anyio.sleep(0.025)
        await committed_through(pool, ids[-1], timeout=10)
        tg.cancel_scope.cancel()
    await projector.close()
    assert spy.commits <= 6, spy.commits  # not 20
