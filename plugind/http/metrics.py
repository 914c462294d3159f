"""``GET /metrics``: Prometheus text computed at scrape time from Postgres and Redis.

Nothing is kept in the process: each scrape reads the read models, the stream's lag and the
plugin pools the worker nodes published (:mod:`plugind.bus.nodes`), builds metric families into
a fresh ``CollectorRegistry`` and renders it. So several apps (or tests) in one process never
share or double-register collectors, and every node reports the same numbers, the pools of
``--role worker`` nodes (which serve no HTTP) included, labelled by ``node``.
The one exception is what only this node can know, the outages it saw: the daemon's outage
trackers (``plugind.outage``) are read at scrape time into counters, per node.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any, Final

import asyncpg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from plugind.bus.keys import Keys
from plugind.bus.nodes import NodeReport, read_reports
from plugind.http.health import probe
from plugind.outage import Outages
from plugind.projections.lag import projector_lag
from plugind.projections.queries import count_by_status, get_checkpoint
from plugind.projections.read_models import PLUGIN_STATUSES, TASK_STATUSES
from plugind.projections.stats import task_stats

RECENT_WINDOW: Final = timedelta(minutes=5)
POOL_LABELS: Final = ["node", "plugin", "identifier"]


class _Snapshot(Collector):
    def __init__(self, families: Iterable[Any]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Any]:
        return iter(self._families)


async def _database_metrics(pool: asyncpg.Pool) -> list[Any]:
    async with pool.acquire(timeout=2.0) as conn:
        tasks = await count_by_status(conn, "tasks")
        plugins = await count_by_status(conn, "plugins")
        checkpoint = await get_checkpoint(conn)
        recent = await task_stats(conn, window=RECENT_WINDOW)
    task_family = GaugeMetricFamily(
        "plugind_tasks", "Task requests in the read model, by status", labels=["status"]
    )
    for status in TASK_STATUSES:
        task_family.add_metric([status], tasks.get(status, 0))
    plugin_family = GaugeMetricFamily(
        "plugind_plugins", "Plugins per tenant in the read model, by status", labels=["status"]
    )
    for status in PLUGIN_STATUSES:
        plugin_family.add_metric([status], plugins.get(status, 0))
    position = GaugeMetricFamily(
        "plugind_event_log_position", "Position of the last event the projector committed"
    )
    position.add_metric([], checkpoint.last_position if checkpoint else 0)
    durations = GaugeMetricFamily(
        "plugind_task_duration_ms",
        "Task duration percentiles over tasks finished in the last 5 minutes",
        labels=["quantile"],
    )
    d = recent.overall.durations
    for quantile, value in (("0.5", d.p50_ms), ("0.95", d.p95_ms), ("0.99", d.p99_ms)):
        if value is not None:
            durations.add_metric([quantile], value)
    return [task_family, plugin_family, position, durations]


def outage_metrics(outages: Outages) -> list[Any]:
    """Counters of the outages this node saw per dependency: how many, and how long in all."""
    count = CounterMetricFamily(
        "plugind_dependency_outages",
        "Outages of a dependency this node saw (unreachable, then reachable again)",
        labels=["dependency"],
    )
    seconds = CounterMetricFamily(
        "plugind_dependency_outage_seconds",
        "Total seconds a dependency was unreachable from this node, the current outage included",
        labels=["dependency"],
    )
    for dependency in outages:
        label = dependency.name.lower()
        count.add_metric([label], dependency.outages)
        seconds.add_metric([label], round(dependency.down_seconds, 3))
    return [count, seconds]


def _pool_metrics(reports: list[NodeReport]) -> list[Any]:
    """Per node and plugin version: live processes, requests in flight, restarts, memory."""
    processes = GaugeMetricFamily(
        "plugind_plugin_processes", "Live plugin processes", labels=POOL_LABELS
    )
    in_flight = GaugeMetricFamily(
        "plugind_plugin_in_flight", "Requests running in plugin processes", labels=POOL_LABELS
    )
    # a counter: it only grows while the node runs the plugin, so rate() and increase() apply
    restarts = CounterMetricFamily(
        "plugind_plugin_restarts",
        "Plugin processes started again after one crashed or was killed",
        labels=POOL_LABELS,
    )
    rss = GaugeMetricFamily(
        "plugind_plugin_rss_bytes",
        "Resident memory of a plugin's processes and their children, last sample",
        labels=POOL_LABELS,
    )
    for report in reports:
        for plugin in report.pool.plugins:
            labels = [report.node, plugin.plugin_id, plugin.identifier]
            processes.add_metric(labels, plugin.processes)
            in_flight.add_metric(labels, plugin.in_flight)
            restarts.add_metric(labels, plugin.restarts)
            if plugin.rss_bytes is not None:
                rss.add_metric(labels, plugin.rss_bytes)
    return [processes, in_flight, restarts, rss]


async def render_metrics(
    redis: Redis, pool: asyncpg.Pool, keys: Keys, outages: Outages | None = None
) -> bytes:
    """The Prometheus text exposition of the current state; never raises for a dead dependency."""
    up = GaugeMetricFamily("plugind_up", "Whether a dependency answered", labels=["component"])
    families: list[Any] = [up]
    if outages is not None:
        families.extend(outage_metrics(outages))
    db = await probe(lambda: _database_metrics(pool))
    up.add_metric(["postgres"], 1 if db.ok else 0)
    if db.ok:
        families.extend(db.value)
    lag = await probe(lambda: projector_lag(redis, keys))
    up.add_metric(["redis"], 1 if lag.ok else 0)
    if lag.ok:
        gauge = GaugeMetricFamily(
            "plugind_projector_lag", "Events in the stream not yet committed to Postgres"
        )
        gauge.add_metric([], lag.value)
        families.append(gauge)
    reports = await probe(lambda: read_reports(redis, keys))
    if reports.ok:  # else Redis is down, which plugind_up already says
        families.extend(_pool_metrics(reports.value))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry)
