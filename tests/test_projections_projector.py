"""The projector on real Redis and Postgres: log, chain, read models, replays, garbage, lock."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import asyncpg
import pytest
import redis.asyncio as aioredis

from plugind.bus.codec import text
from plugind.bus.keys import PROJECTOR_GROUP, Keys
from plugind.messages import (
    CommandDeadLettered,
    CommandRejected,
    ErrorInfo,
    Event,
    EventFactory,
    Installed,
    InstallProgress,
    InstallStarted,
    ManifestSummary,
    TaskFailed,
    TaskResult,
    TaskStarted,
    TaskSucceeded,
    TaskTimedOut,
    Uninstalled,
    encode,
)
from plugind.projections.hashchain import verify_event_log
from plugind.projections.lag import projector_lag
from plugind.projections.projector import Projector
from plugind.projections.queries import get_checkpoint, get_task, list_plugins

pytestmark = pytest.mark.anyio
ev = EventFactory("test-node")
T = "t1"


async def publish(redis: aioredis.Redis, keys: Keys, *events: Event | bytes) -> list[str]:
    ids = []
    for event in events:
        raw = event if isinstance(event, bytes) else encode(event)
        entry_id = await redis.xadd(keys.events, {"event": raw})
        ids.append(text(entry_id))
    return ids


def installed(plugin: str = "acme/calc", version: str = "0.1.0", rid: str = "i1") -> Installed:
    return ev(
        Installed,
        request_id=rid,
        tenant_id=T,
        plugin_id=plugin,
        identifier=f"{plugin}:{version}@abc",
        version=version,
        checksum="abc",
        manifest=ManifestSummary(author="acme", tools=["add"]),
        duration_ms=12.5,
    )


def started(rid: str, attempt: int = 1) -> TaskStarted:
    return ev(
        TaskStarted,
        request_id=rid,
        tenant_id=T,
        plugin_id="acme/calc",
        identifier="acme/calc:0.1.0@abc",
        access="tool",
        action="invoke_tool",
        attempt=attempt,
    )


def succeeded(rid: str, result: Any = 3, duration: float = 8.0) -> TaskSucceeded:
    return ev(
        TaskSucceeded,
        request_id=rid,
        tenant_id=T,
        plugin_id="acme/calc",
        result=TaskResult(chunks=[{"value": result}]),
        duration_ms=duration,
    )


def failed(rid: str, code: str = "plugin_error") -> TaskFailed:
    return ev(
        TaskFailed,
        request_id=rid,
        tenant_id=T,
        plugin_id="acme/calc:0.1.0@abc",
        error=ErrorInfo(code, "boom", error_type="ValueError"),
        duration_ms=3.0,
    )


async def log_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT position, stream_id, event_id, type, request_id, plugin_id,"
        " payload::text AS payload FROM event_log ORDER BY position"
    )


async def pending(redis: aioredis.Redis, keys: Keys) -> int:
    info = await redis.xpending(keys.events, PROJECTOR_GROUP)
    return int(info["pending"])


async def test_log_is_gap_free_chained_and_acknowledged(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    first = [
        ev(InstallStarted, request_id="i1", tenant_id=T, source="path:x.difypkg"),
        ev(InstallProgress, request_id="i1", tenant_id=T, step="verify", message="ok"),
        installed(),
    ]
    ids = await publish(redis, keys, *first)
    assert await projector.run_once() == 3
    ids += await publish(redis, keys, started("r1"), succeeded("r1"))
    assert await projector.run_once() == 2
    assert await projector.run_once() == 0

    rows = await log_rows(pool)
    assert [r["position"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["stream_id"] for r in rows] == ids
    assert [r["type"] for r in rows] == [
        "plugin.install_started",
        "plugin.install_progress",
        "plugin.installed",
        "task.started",
        "task.succeeded",
    ]
    assert rows[2]["plugin_id"] == "acme/calc"
    assert await pending(redis, keys) == 0
    async with pool.acquire() as conn:
        result = await verify_event_log(conn)
        checkpoint = await get_checkpoint(conn)
    assert result.ok, result.reason
    assert result.checked == 5
    assert checkpoint is not None
    assert (checkpoint.last_position, checkpoint.last_stream_id) == (5, ids[-1])
    assert checkpoint.head_hash == result.head_hash


async def test_plugin_read_model(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    await publish(redis, keys, installed(), installed("acme/other", rid="i2"))
    await projector.run_once()
    plugins = await list_plugins(pool, tenant_id=T)
    assert [(p.plugin_id, p.status, p.version) for p in plugins] == [
        ("acme/calc", "installed", "0.1.0"),
        ("acme/other", "installed", "0.1.0"),
    ]
    assert plugins[0].manifest["tools"] == ["add"]

    await publish(
        redis,
        keys,
        ev(
            Uninstalled,
            request_id="u1",
            tenant_id=T,
            plugin_id="acme/other",
            identifier="acme/other:0.1.0@abc",
        ),
        installed(version="0.2.0", rid="i3"),
    )
    await projector.run_once()
    assert [(p.plugin_id, p.version) for p in await list_plugins(pool)] == [("acme/calc", "0.2.0")]
    gone = await list_plugins(pool, status="uninstalled")
    assert [(p.plugin_id, p.status) for p in gone] == [("acme/other", "uninstalled")]


async def test_task_read_model(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    timed_out = ev(
        TaskTimedOut,
        request_id="r3",
        tenant_id=T,
        plugin_id="acme/calc",
        timeout_s=30,
        duration_ms=30_001.0,
    )
    await publish(
        redis,
        keys,
        started("r1"),
        started("r1", attempt=2),
        succeeded("r1"),
        failed("r2", code="unknown_plugin"),
        started("r3"),
        timed_out,
        started("r4"),
    )
    assert await projector.run_once() == 7

    ok = await get_task(pool, "r1")
    assert ok is not None
    assert (ok.status, ok.attempts, ok.duration_ms) == ("succeeded", 2, 8.0)
    assert ok.result == {"chunks": [{"value": 3}]}
    assert ok.started_at is not None and ok.finished_at is not None
    assert (ok.plugin_id, ok.identifier, ok.access) == ("acme/calc", "acme/calc:0.1.0@abc", "tool")

    never_started = await get_task(pool, "r2")
    assert never_started is not None
    assert (never_started.status, never_started.started_at) == ("failed", None)
    assert never_started.error["code"] == "unknown_plugin"
    assert never_started.plugin_id == "acme/calc"

    late = await get_task(pool, "r3")
    assert late is not None and late.status == "timed_out"
    assert late.error["code"] == "timeout"
    running = await get_task(pool, "r4")
    assert running is not None and running.status == "running"
    assert await get_task(pool, "nope") is None


async def test_first_terminal_state_wins(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    error = ErrorInfo("malformed_command", "bad")
    await publish(redis, keys, started("r1"), succeeded("r1"))
    await projector.run_once()
    await publish(
        redis,
        keys,
        failed("r1"),
        started("r1", attempt=3),
        ev(
            CommandRejected,
            request_id="r1",
            tenant_id=T,
            stream=keys.tasks,
            entry_id="1-0",
            error=error,
            raw="{}",
        ),
        started("r2"),
        ev(
            CommandDeadLettered,
            request_id="r2",
            tenant_id=T,
            stream=keys.tasks,
            entry_id="2-0",
            deliveries=5,
            error=ErrorInfo("plugin_crashed", "died"),
        ),
        succeeded("r2"),
        ev(
            CommandRejected,
            request_id="r5",
            tenant_id=T,
            stream=keys.tasks,
            entry_id="3-0",
            error=error,
            raw="{",
        ),
        ev(
            CommandRejected,
            request_id="i9",
            tenant_id=T,
            stream=keys.install,
            entry_id="4-0",
            error=error,
            raw="{",
        ),
    )
    assert await projector.run_once() == 8

    r1 = await get_task(pool, "r1")
    assert r1 is not None
    assert (r1.status, r1.attempts, r1.error) == ("succeeded", 1, None)
    r2 = await get_task(pool, "r2")
    assert r2 is not None
    assert (r2.status, r2.error["code"], r2.result) == ("dead_lettered", "plugin_crashed", None)
    r5 = await get_task(pool, "r5")
    assert r5 is not None and r5.status == "rejected"
    assert await get_task(pool, "i9") is None  # not a task command


async def test_crash_after_commit_before_ack_replays_harmlessly(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    await publish(redis, keys, started("r1"), succeeded("r1"), installed())
    assert await projector.try_activate()
    batch = await projector.reader.read()
    assert await projector.commit(batch) == 3  # committed, never acknowledged: the "crash"
    await projector.close()
    assert await pending(redis, keys) == 3

    # Another node takes over: it must claim the dead node's entries and skip them.
    standby = Projector(redis, pool, keys, "node-b", block_ms=50)
    try:
        assert await standby.run_once() == 0
        assert await pending(redis, keys) == 0
        await publish(redis, keys, failed("r2"))
        assert await standby.run_once() == 1
    finally:
        await standby.close()
    # A group reset (re-delivery of everything) changes nothing either.
    await redis.xgroup_setid(keys.events, PROJECTOR_GROUP, "0")
    assert await projector.run_once() == 0
    rows = await log_rows(pool)
    assert [r["position"] for r in rows] == [1, 2, 3, 4]
    async with pool.acquire() as conn:
        assert (await verify_event_log(conn)).ok


async def test_crash_before_commit_is_projected_by_the_next_projector(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    await publish(redis, keys, started("r1"), succeeded("r1"))
    assert await projector.try_activate()
    assert len(await projector.reader.read()) == 2  # read, then "crash" before the commit
    await projector.close()
    await publish(redis, keys, failed("r2"))

    standby = Projector(redis, pool, keys, "node-b", block_ms=50)
    try:
        assert await standby.run_once() == 2
        assert await standby.run_once() == 1
    finally:
        await standby.close()
    assert [r["request_id"] for r in await log_rows(pool)] == ["r1", "r1", "r2"]
    task = await get_task(pool, "r1")
    assert task is not None and task.status == "succeeded"


async def test_garbage_is_logged_as_unknown_and_projection_continues(
    redis: aioredis.Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    projector: Projector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await publish(redis, keys, b"not json \x00\xff" + b"x" * 3000)
    await publish(redis, keys, b'{"type": "task.exploded", "request_id": "rx", "tenant_id": "t"}')
    await redis.xadd(keys.events, {"something": "else"})
    await publish(redis, keys, installed())
    with caplog.at_level(logging.ERROR, logger="plugind.projections.commit"):
        assert await projector.run_once() == 4

    rows = await log_rows(pool)
    assert [r["type"] for r in rows] == ["unknown", "unknown", "unknown", "plugin.installed"]
    assert [r["position"] for r in rows] == [1, 2, 3, 4]
    import orjson

    first = orjson.loads(rows[0]["payload"])
    assert first["raw"].startswith("not json \ufffd")
    assert len(first["raw"]) <= 1024
    assert "not valid JSON" in first["error"]
    assert rows[1]["request_id"] == "rx" and rows[1]["event_id"] is None
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 3
    assert await pending(redis, keys) == 0
    assert [p.plugin_id for p in await list_plugins(pool)] == ["acme/calc"]
    async with pool.acquire() as conn:
        assert (await verify_event_log(conn)).ok


async def test_duplicate_event_id_is_logged_once(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    event = succeeded("r1")
    await publish(redis, keys, event, event)
    assert await projector.run_once() == 1
    await publish(redis, keys, event, failed("r2"))
    assert await projector.run_once() == 1
    assert [r["position"] for r in await log_rows(pool)] == [1, 2]


async def test_awkward_json_is_stored_and_still_verifies(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    # jsonb cannot hold NUL and rewrites numbers (1e16 -> 10000000000000000, -0.0 -> 0.0):
    # the chain must be computed over what Postgres stores, or verification would fail.
    await publish(
        redis,
        keys,
        succeeded("r1", result={"nul": "a\x00b", "big": 1e16, "neg": -0.0, "huge": 10**30}),
    )
    assert await projector.run_once() == 1
    task = await get_task(pool, "r1")
    assert task is not None
    assert task.result["chunks"][0]["value"]["nul"] == "a\ufffdb"
    async with pool.acquire() as conn:
        result = await verify_event_log(conn)
    assert result.ok, result.reason


async def test_only_one_projector_is_active(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    other = Projector(redis, pool, keys, "node-b", block_ms=50)
    try:
        await publish(redis, keys, started("r1"))
        assert await projector.run_once() == 1
        await publish(redis, keys, succeeded("r1"))
        assert await other.run_once() == 0
        assert projector.active and not other.active
        await projector.close()
        assert await other.run_once() == 1
        assert other.active
        assert not await projector.try_activate()
    finally:
        await other.close()


async def test_run_fails_over_to_a_standby(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    first = Projector(redis, pool, keys, "node-a", block_ms=20, standby_interval=0.05)
    second = Projector(redis, pool, keys, "node-b", block_ms=20, standby_interval=0.05)

    async def logged() -> int:
        return int(await pool.fetchval("SELECT count(*) FROM event_log"))

    async def wait_for(n: int) -> None:
        with anyio.fail_after(5):
            while await logged() < n:
                await anyio.sleep(0.02)

    async with anyio.create_task_group() as outer:
        first_scope = anyio.CancelScope()

        async def run_first() -> None:
            with first_scope:
                await first.run()

        outer.start_soon(run_first)
        with anyio.fail_after(5):
            while not first.active:
                await anyio.sleep(0.01)
        outer.start_soon(second.run)
        await publish(redis, keys, started("r1"), succeeded("r1"))
        await wait_for(2)
        assert first.active and not second.active
        first_scope.cancel()
        await publish(redis, keys, started("r2"))
        await wait_for(3)
        assert second.active and not first.active
        outer.cancel_scope.cancel()
    assert not second.active


async def test_lag(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    assert await projector_lag(redis, keys) == 0
    await publish(redis, keys, started("r1"), started("r2"), started("r3"))
    assert await projector_lag(redis, keys) == 3  # no group yet: the whole stream
    assert await projector.try_activate()
    assert await projector.lag() == 3
    await projector.reader.read()  # delivered, not acknowledged: still lag
    assert await projector.lag() == 3
    await projector.close()
    other = Projector(redis, pool, keys, "node-b", block_ms=50)
    try:
        assert await other.run_once() == 3
    finally:
        await other.close()
    assert await projector_lag(redis, keys) == 0


async def test_a_poisonous_event_does_not_wedge_the_projector(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    # attempt does not fit the tasks.attempts integer column: its read-model update always fails
    await publish(redis, keys, started("r1", attempt=2**40), started("r2"))
    runner = Projector(redis, pool, keys, "node-a", block_ms=20)
    with caplog.at_level(logging.ERROR, logger="plugind.projections"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)
            with anyio.fail_after(5):
                while await get_task(pool, "r2") is None:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    assert [r["request_id"] for r in await log_rows(pool)] == ["r1", "r2"]
    assert await get_task(pool, "r1") is None
    assert any("Read-model update skipped" in r.getMessage() for r in caplog.records)
    assert await pending(redis, keys) == 0
