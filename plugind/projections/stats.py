"""Task statistics from the ``tasks`` read model, as typed immutable snapshots.

One query computes the totals and the per-plugin rows (``GROUPING SETS``), so the overall numbers
and the per-plugin ones describe the same set of tasks. A task is inside a window when its last
activity (``finished_at``, else ``created_at``) is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from plugind.projections._db import Executor
from plugind.projections.read_models import TASK_STATUSES, TERMINAL_TASK_STATUSES

_COUNTS: Final = ",\n    ".join(
    f"count(*) FILTER (WHERE status = '{status}') AS {status}" for status in TASK_STATUSES
)

_STATS_SQL: Final = f"""
SELECT plugin_id, GROUPING(plugin_id) AS grand, count(*) AS total,
    {_COUNTS},
    avg(duration_ms) AS avg_ms,
    percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration_ms) AS pct
FROM tasks
WHERE ($1::interval IS NULL OR coalesce(finished_at, created_at) >= now() - $1::interval)
  AND ($2::text IS NULL OR plugin_id = $2)
GROUP BY GROUPING SETS ((), (plugin_id))
ORDER BY grand DESC, plugin_id NULLS LAST
"""


class DurationStats(NamedTuple):
    """Milliseconds over the tasks that have a duration (the finished ones); None if none."""

    avg_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True, slots=True)
class GroupStats:
    """Counts and durations of one set of tasks (all of them, or one plugin's)."""

    plugin_id: str | None
    total: int
    counts: Mapping[str, int]
    durations: DurationStats

    @property
    def terminal(self) -> int:
        return sum(n for status, n in self.counts.items() if status in TERMINAL_TASK_STATUSES)

    @property
    def success_rate(self) -> float | None:
        """Succeeded / finished (any terminal status); None before anything finished."""
        terminal = self.terminal
        return self.counts.get("succeeded", 0) / terminal if terminal else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "plugin_id": self.plugin_id,
            "total": self.total,
            "counts": dict(self.counts),
            "success_rate": self.success_rate,
            "duration_ms": {
                "avg": self.durations.avg_ms,
                "p50": self.durations.p50_ms,
                "p95": self.durations.p95_ms,
                "p99": self.durations.p99_ms,
            },
        }


@dataclass(frozen=True, slots=True)
class TaskStats:
    window: timedelta | None
    plugin_id: str | None
    overall: GroupStats
    plugins: tuple[GroupStats, ...]

    def for_plugin(self, plugin_id: str) -> GroupStats | None:
        return next((p for p in self.plugins if p.plugin_id == plugin_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_s": self.window.total_seconds() if self.window is not None else None,
            "plugin": self.plugin_id,
            "overall": self.overall.to_dict(),
            "plugins": [p.to_dict() for p in self.plugins],
        }


def _group(row: Any, plugin_id: str | None) -> GroupStats:
    pct = row["pct"] or [None, None, None]
    return GroupStats(
        plugin_id=plugin_id,
        total=int(row["total"]),
        counts=MappingProxyType({status: int(row[status]) for status in TASK_STATUSES}),
        durations=DurationStats(
            float(row["avg_ms"]) if row["avg_ms"] is not None else None,
            *(float(v) if v is not None else None for v in pct),
        ),
    )


async def task_stats(
    conn: Executor, *, window: timedelta | None = None, plugin_id: str | None = None
) -> TaskStats:
    """Stats of the tasks active within ``window`` (None: all), of one plugin or of all."""
    rows = await conn.fetch(_STATS_SQL, window, plugin_id)
    overall = next(r for r in rows if r["grand"])
    return TaskStats(
        window=window,
        plugin_id=plugin_id,
        overall=_group(overall, None),
        plugins=tuple(_group(r, r["plugin_id"]) for r in rows if not r["grand"]),
    )
