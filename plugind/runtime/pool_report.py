"""A node's plugin pool in numbers, in the one shape every reader sees.

``/health`` shows it under ``components.plugins``, each worker publishes it to Redis for
``plugind status`` in another process (:mod:`plugind.bus.nodes`), and ``/metrics`` turns the
published ones into gauges. A msgspec schema rather than the pool's own tuples, so the JSON has
named fields, and what one process encodes another decodes with validation.
"""

from __future__ import annotations

from collections.abc import Iterable

from msgspec import Struct

from plugind.runtime.pool import PluginStats, PoolSnapshot, ProcessStats


class ProcessReport(Struct, kw_only=True):
    """One process of a plugin (``PLUGIN_INSTANCES`` slots per plugin)."""

    slot: int
    pid: int | None
    alive: bool  # false while it is starting, or dead and not yet replaced
    in_flight: int
    uptime_s: float | None
    heartbeat_age_s: float | None
    rss_bytes: int | None  # whole process group, last sample; None before the first
    memory_limit_bytes: int | None


class PluginReport(Struct, kw_only=True):
    """One plugin version on one node."""

    identifier: str
    plugin_id: str  # author/name, the same for every version
    processes: int  # alive
    in_flight: int
    restarts: int  # since the pool first started this version on this node
    consecutive_failures: int
    rss_bytes: int | None  # sum over the processes sampled so far
    instances: list[ProcessReport]


class PoolReport(Struct, kw_only=True):
    """Every plugin version this node runs, and the totals."""

    processes: int
    in_flight: int
    restarts: int
    rss_bytes: int | None
    plugins: list[PluginReport]


def pool_report(snapshot: PoolSnapshot) -> PoolReport:
    plugins = [_plugin(stats) for stats in snapshot.plugins]
    return PoolReport(
        processes=snapshot.processes,
        in_flight=snapshot.in_flight,
        restarts=snapshot.restarts,
        rss_bytes=_sum(p.rss_bytes for p in plugins),
        plugins=plugins,
    )


def _plugin(stats: PluginStats) -> PluginReport:
    instances = [_process(p) for p in stats.processes]
    return PluginReport(
        identifier=stats.identifier,
        plugin_id=stats.identifier.split(":", 1)[0],
        processes=sum(1 for p in stats.processes if p.alive),
        in_flight=stats.in_flight,
        restarts=stats.restarts,
        consecutive_failures=stats.consecutive_failures,
        rss_bytes=_sum(p.rss_bytes for p in instances),
        instances=instances,
    )


def _process(stats: ProcessStats) -> ProcessReport:
    return ProcessReport(
        slot=stats.slot,
        pid=stats.pid,
        alive=stats.alive,
        in_flight=stats.in_flight,
        uptime_s=_round(stats.uptime_s),
        heartbeat_age_s=_round(stats.heartbeat_age_s),
        rss_bytes=stats.rss,
        memory_limit_bytes=stats.memory_limit,
    )


def _sum(values: Iterable[int | None]) -> int | None:
    """The sum of the known values; ``None`` when none is known (not the same as 0 bytes)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)
