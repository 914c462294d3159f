"""Point-in-time replay on real Redis and Postgres: events projected by the real projector, then
the state at a position or a time recomputed from ``event_log`` alone.

``project_history`` is also the realistic history of ``test_projections_rebuild``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from plugind.bus.keys import Keys
from plugind.messages import (
    CommandRejected,
    ErrorInfo,
    Event,
    EventFactory,
    Installed,
    InstallFailed,
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
from plugind.projections.projector import Projector
from plugind.projections.queries import get_task, list_plugins, rfc3339
from plugind.projections.read_models import apply_event
from plugind.projections.replay import all_tasks, state_at

pytestmark = pytest.mark.anyio
ev = EventFactory("test-node")
T1, T2 = "t1", "t2"
# Well before "now", so the garbage entry (timed by its stream id, i.e. now) comes after them all.
BASE = datetime(2020, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class History:
    mid_position: int  # the log position of r3's task.started: before the upgrade
    mid_time: datetime  # that event's at
    head: int


def _timed(events: list[Event | bytes]) -> list[Event | bytes]:
    """Events one second apart from BASE, so a time bound is deterministic."""
    out: list[Event | bytes] = []
    for i, event in enumerate(events):
        if isinstance(event, bytes):
            out.append(event)
        else:
            out.append(msgspec.structs.replace(event, at=rfc3339(BASE + timedelta(seconds=i))))
    return out


def installed(plugin: str, version: str, rid: str, tenant: str = T1, **kw: Any) -> Installed:
    return ev(
        Installed,
        request_id=rid,
        tenant_id=tenant,
        plugin_id=plugin,
        identifier=f"{plugin}:{version}@abc{version}",
        version=version,
        checksum=f"abc{version}",
        manifest=ManifestSummary(author="acme", tools=["add"]),
        duration_ms=12.5,
        **kw,
    )


def started(rid: str, attempt: int = 1) -> TaskStarted:
    return ev(
        TaskStarted,
        request_id=rid,
        tenant_id=T1,
        plugin_id="acme/calc",
        identifier="acme/calc:0.1.0@abc0.1.0",
        access="tool",
        action="invoke_tool",
        attempt=attempt,
    )


def history_events(keys: Keys) -> tuple[list[Event | bytes], list[Event | bytes]]:
    """Two batches: installs and tasks up to r3 running; then an upgrade, endings, a rejection."""
    error = ErrorInfo("malformed_command", "task command is missing `plugin_id`")
    first: list[Event | bytes] = [
        ev(InstallStarted, request_id="i1", tenant_id=T1, source="path:calc.difypkg"),
        ev(InstallProgress, request_id="i1", tenant_id=T1, step="verify", message="ok"),
        installed("acme/calc", "0.1.0", "i1"),
        installed("acme/other", "0.1.0", "i2", tenant=T2),
        started("r1"),
        ev(
            TaskSucceeded,
            request_id="r1",
            tenant_id=T1,
            plugin_id="acme/calc",
            # jsonb rewrites these: a rebuild must still agree with what was projected live
            result=TaskResult(chunks=[{"sum": 3, "big": 1e16, "neg": -0.0, "nul": "a\x00b"}]),
            duration_ms=8.0,
        ),
        b"not json at all",
        started("r2"),
        started("r2", attempt=2),
        ev(
            TaskFailed,
            request_id="r2",
            tenant_id=T1,
            plugin_id="acme/calc:0.1.0@abc0.1.0",
            error=ErrorInfo("plugin_error", "boom", error_type="ValueError"),
            duration_ms=3.0,
        ),
        started("r3"),
    ]
    second: list[Event | bytes] = [
        installed("acme/calc", "0.2.0", "i3", upgraded_from="acme/calc:0.1.0@abc0.1.0"),
        ev(
            TaskTimedOut,
            request_id="r3",
            tenant_id=T1,
            plugin_id="acme/calc",
            timeout_s=30,
            duration_ms=30_001.0,
        ),
        ev(
            Uninstalled,
            request_id="u1",
            tenant_id=T2,
            plugin_id="acme/other",
            identifier="acme/other:0.1.0@abc0.1.0",
        ),
        ev(
            CommandRejected,
            request_id="r4",
            tenant_id=T1,
            stream=keys.tasks,
            entry_id="1-0",
            error=error,
            raw='{"type": "task"}',
        ),
        ev(
            InstallFailed,
            request_id="i5",
            tenant_id=T1,
            plugin_id="acme/broken",
            error=ErrorInfo("invalid_package", "no manifest.yaml"),
            duration_ms=1.0,
        ),
        started("r5"),
    ]
    timed = _timed(first + second)
    return timed[: len(first)], timed[len(first) :]


async def publish(redis: aioredis.Redis, keys: Keys, events: list[Event | bytes]) -> None:
    for event in events:
        raw = event if isinstance(event, bytes) else encode(event)
        await redis.xadd(keys.events, {"event": raw})


async def project_history(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> History:
    first, second = history_events(keys)
    await publish(redis, keys, first)
    assert await projector.run_once() == len(first)
    await publish(redis, keys, second)
    assert await projector.run_once() == len(second)
    mid = await pool.fetchrow(
        "SELECT position, at FROM event_log WHERE request_id = 'r3' AND type = 'task.started'"
    )
    assert mid is not None
    head = int(await pool.fetchval("SELECT max(position) FROM event_log"))
    return History(mid["position"], mid["at"], head)


async def live_state(conn: asyncpg.Connection | Any) -> tuple[list[Any], list[Any]]:
    plugins = [p.to_dict() for p in await list_plugins(conn, status=None)]
    tasks = sorted((t.to_dict() for t in await all_tasks(conn)), key=lambda t: t["request_id"])
    return plugins, tasks


async def test_state_at_an_intermediate_position_is_before_the_upgrade(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    history = await project_history(redis, pool, keys, projector)
    async with pool.acquire() as conn:
        state = await state_at(conn, until_position=history.mid_position)

    assert (state.position, state.events) == (history.mid_position, history.mid_position)
    assert state.at == history.mid_time
    calc = {p.plugin_id: p for p in state.plugins[T1]}["acme/calc"]
    assert (calc.version, calc.status, calc.identifier) == (
        "0.1.0",
        "installed",
        "acme/calc:0.1.0@abc0.1.0",
    )
    assert [(p.plugin_id, p.status) for p in state.plugins[T2]] == [("acme/other", "installed")]
    tasks = {t.request_id: t for t in state.tasks}
    assert tasks["r3"].status == "running" and tasks["r3"].finished_at is None
    assert (tasks["r1"].status, tasks["r2"].status, tasks["r2"].attempts) == (
        "succeeded",
        "failed",
        2,
    )
    assert "r4" not in tasks and "r5" not in tasks
    assert state.task_counts() == {"failed": 1, "running": 1, "succeeded": 1}

    # The live read models meanwhile are at the head, untouched by the replay.
    live = await get_task(pool, "r3")
    assert live is not None and live.status == "timed_out"
    assert [p.version for p in await list_plugins(pool, tenant_id=T1)] == ["0.2.0"]


async def test_state_at_a_time_agrees_with_the_position(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    history = await project_history(redis, pool, keys, projector)
    async with pool.acquire() as conn:
        by_position = await state_at(conn, until_position=history.mid_position)
        by_time = await state_at(conn, until_time=history.mid_time)
        naive = await state_at(conn, until_time=history.mid_time.replace(tzinfo=None))
        before_everything = await state_at(conn, until_time=BASE - timedelta(days=1))
    # The garbage row is timed by its stream id (now): a time bound leaves it out.
    assert by_time.position == history.mid_position
    assert by_time.events == history.mid_position - 1
    assert by_time.plugins == by_position.plugins and by_time.tasks == by_position.tasks
    assert naive.tasks == by_time.tasks
    assert (before_everything.position, before_everything.plugins, before_everything.tasks) == (
        0,
        {},
        (),
    )
    with pytest.raises(ValueError, match="not both"):
        async with pool.acquire() as conn:
            await state_at(conn, until_position=1, until_time=BASE)


async def test_state_at_the_head_equals_the_live_read_models(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    history = await project_history(redis, pool, keys, projector)
    async with pool.acquire() as conn:
        live = await live_state(conn)
        state = await state_at(conn)
        assert await live_state(conn) == live  # nothing live changed
    assert state.position == state.events == history.head
    plugins = [p.to_dict() for rows in state.plugins.values() for p in rows]
    tasks = sorted((t.to_dict() for t in state.tasks), key=lambda t: t["request_id"])
    assert (plugins, tasks) == live
    rejected = {t["request_id"]: t for t in tasks}["r4"]
    assert (rejected["status"], rejected["error"]["code"]) == ("rejected", "malformed_command")
    counts = {"failed": 1, "rejected": 1, "running": 1, "succeeded": 1, "timed_out": 1}
    assert state.task_counts() == counts


async def test_replay_on_a_connection_with_cached_read_model_statements(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> None:
    # asyncpg caches prepared statements and Postgres does not re-plan them when a temporary
    # table starts shadowing the live one: a replay on a connection that already folded events
    # into the live tables must still fold into its own copies, and leave that connection
    # writing to the live tables afterwards. (The trap needs a session whose temporary schema
    # already exists, otherwise creating it changes the search path and forces a re-plan.)
    history = await project_history(redis, pool, keys, projector)
    upgrade = installed("acme/calc", "0.3.0", "i9")
    async with pool.acquire() as conn:
        await conn.execute("CREATE TEMPORARY TABLE scratch (x int)")
        for _ in range(2):  # prepared, then cached
            await apply_event(conn, installed("acme/new", "1.0.0", "i8"), at=BASE)
        state = await state_at(conn, until_position=history.mid_position)
        assert "acme/new" not in {p.plugin_id for p in state.plugins[T1]}
        assert {p.plugin_id: p.version for p in state.plugins[T1]}["acme/calc"] == "0.1.0"
        await apply_event(conn, upgrade, at=BASE)
        again = await state_at(conn, until_position=history.mid_position)
        assert again.plugins == state.plugins
    live = {p.plugin_id: p.version for p in await list_plugins(pool, tenant_id=T1)}
    assert live == {"acme/calc": "0.3.0", "acme/new": "1.0.0"}
