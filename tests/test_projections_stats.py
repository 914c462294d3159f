"""Task statistics on known data: counts, success rate, percentiles, window and plugin filters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from plugind.messages import (
    ErrorInfo,
    EventFactory,
    TaskFailed,
    TaskResult,
    TaskStarted,
    TaskSucceeded,
    TaskTimedOut,
)
from plugind.projections.migrate import migrate
from plugind.projections.read_models import apply_event
from plugind.projections.stats import task_stats

pytestmark = pytest.mark.anyio
ev = EventFactory("test-node")


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    await migrate(conn)
    yield conn
    await conn.close()


async def _seed(conn: asyncpg.Connection) -> None:
    now = datetime.now(UTC)
    # acme/calc: 100 recent successes taking 1..100 ms
    for n in range(1, 101):
        event = ev(
            TaskSucceeded,
            request_id=f"c{n}",
            tenant_id="t",
            plugin_id="acme/calc",
            result=TaskResult(chunks=[]),
            duration_ms=float(n),
        )
        await apply_event(conn, event, at=now)
    # acme/slow: recent failure + timeout + one still running; two successes 3 h ago
    await apply_event(
        conn,
        ev(
            TaskFailed,
            request_id="s1",
            tenant_id="t",
            plugin_id="acme/slow:1.0.0@x",
            error=ErrorInfo("plugin_error", "no"),
            duration_ms=1000.0,
        ),
        at=now,
    )
    await apply_event(
        conn,
        ev(
            TaskTimedOut,
            request_id="s2",
            tenant_id="t",
            plugin_id="acme/slow",
            timeout_s=3,
            duration_ms=3000.0,
        ),
        at=now,
    )
    await apply_event(
        conn,
        ev(
            TaskStarted,
            request_id="s3",
            tenant_id="t",
            plugin_id="acme/slow",
            identifier="acme/slow:1.0.0@x",
            access="tool",
            action="invoke_tool",
            attempt=1,
        ),
        at=now,
    )
    for i, ms in enumerate((500.0, 700.0)):
        await apply_event(
            conn,
            ev(
                TaskSucceeded,
                request_id=f"old{i}",
                tenant_id="t",
                plugin_id="acme/slow",
                result=TaskResult(chunks=[]),
                duration_ms=ms,
            ),
            at=now - timedelta(hours=3),
        )


async def test_stats_overall_and_per_plugin(conn: asyncpg.Connection) -> None:
    await _seed(conn)
    stats = await task_stats(conn, window=None, plugin_id=None)

    assert stats.overall.total == 105
    assert stats.overall.counts["succeeded"] == 102
    assert stats.overall.counts["running"] == 1
    assert stats.overall.terminal == 104
    assert stats.overall.success_rate == pytest.approx(102 / 104)

    calc = stats.for_plugin("acme/calc")
    assert calc is not None
    assert calc.total == 100 and calc.success_rate == 1.0
    assert calc.durations.avg_ms == pytest.approx(50.5)
    assert calc.durations.p50_ms == pytest.approx(50.5)
    assert calc.durations.p95_ms == pytest.approx(95.05)
    assert calc.durations.p99_ms == pytest.approx(99.01)

    slow = stats.for_plugin("acme/slow")  # the full identifier was folded to author/name
    assert slow is not None
    assert (slow.total, slow.counts["failed"], slow.counts["timed_out"]) == (5, 1, 1)
    assert slow.success_rate == pytest.approx(2 / 4)
    assert slow.durations.p50_ms == pytest.approx(850.0)  # 500, 700, 1000, 3000

    body = stats.to_dict()
    assert set(body) == {"window_s", "plugin", "overall", "plugins"}
    assert set(body["overall"]["duration_ms"]) == {"avg", "p50", "p95", "p99"}
    assert [p["plugin_id"] for p in body["plugins"]] == ["acme/calc", "acme/slow"]
    with pytest.raises(AttributeError):
        stats.overall.total = 0  # type: ignore[misc]


async def test_window_and_plugin_filters(conn: asyncpg.Connection) -> None:
    await _seed(conn)
    recent = await task_stats(conn, window=timedelta(hours=1), plugin_id="acme/slow")
    assert recent.overall.total == 3
    assert recent.overall.counts["succeeded"] == 0
    assert recent.overall.success_rate == 0.0
    assert recent.overall.durations.p50_ms == pytest.approx(2000.0)  # 1000, 3000
    assert [p.plugin_id for p in recent.plugins] == ["acme/slow"]
    assert recent.to_dict()["window_s"] == 3600.0

    empty = await task_stats(conn, window=timedelta(minutes=5), plugin_id="nobody/none")
    assert empty.overall.total == 0
    assert empty.overall.success_rate is None
    assert empty.overall.durations.p99_ms is None
    assert empty.plugins == ()
