"""``GET /metrics``: every node's metrics, labelled by ``node``, plus the state of the streams.

Two kinds of series, neither computed from Postgres:

- each node's own registry (:mod:`plugind.metrics`: tasks, installs, plugin processes,
  projector commits, HTTP requests, CPU and memory…), fed by the code that does the work. The
  answering node renders its own at once; the others' come from what they publish to Redis
  every few seconds (:mod:`plugind.bus.metrics_share`), so ``--role worker`` nodes, which serve
  no HTTP, are scraped through any ``api`` node, and every ``api`` node answers the same;
- what Redis says at scrape time about the shared streams: length, pending and lag per group,
  dead letters, the projector's backlog, the live nodes; and ``plugind_up``, whether Redis and
  Postgres answered this scrape.

Scrape one ``api`` node (or a load balancer in front of them), not each node: the output is
the whole cluster's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, Final

import asyncpg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from plugind.bus.codec import text
from plugind.bus.keys import Keys
from plugind.bus.metrics_share import read_metrics
from plugind.http.health import probe
from plugind.metrics import NodeMetrics
from plugind.projections.lag import projector_lag

log = logging.getLogger(__name__)

NODE_LABEL: Final = "node"


class _Snapshot(Collector):
    def __init__(self, families: Iterable[Any]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Any]:
        return iter(self._families)


def _get(info: dict[Any, Any], name: str) -> Any:
    value = info.get(name)
    return value if value is not None else info.get(name.encode())


async def _stream_metrics(redis: Redis, keys: Keys) -> list[Any]:
    length = GaugeMetricFamily(
        "plugind_stream_length", "Entries in a stream (trimmed by retention)", labels=["stream"]
    )
    pending = GaugeMetricFamily(
        "plugind_stream_pending",
        "Entries delivered to a group's consumers and not acknowledged yet",
        labels=["stream", "group"],
    )
    lag = GaugeMetricFamily(
        "plugind_stream_lag",
        "Entries in a stream not yet delivered to a group (Redis >= 7)",
        labels=["stream", "group"],
    )
    for stream in (*keys.command_streams, keys.events, keys.dead):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            replies = await pipe.execute(raise_on_error=False)
        size, groups = replies
        length.add_metric([stream], size if isinstance(size, int) else 0)
        if isinstance(groups, ResponseError | Exception):
            continue  # no such stream yet
        for info in groups:
            group = text(_get(info, "name"))
            pending.add_metric([stream, group], int(_get(info, "pending") or 0))
            behind = _get(info, "lag")
            if behind is not None:
                lag.add_metric([stream, group], int(behind))
    projector = GaugeMetricFamily(
        "plugind_projector_lag", "Events in the stream not yet committed to Postgres"
    )
    projector.add_metric([], await projector_lag(redis, keys))
    return [length, pending, lag, projector]


def _relabel(
    families: Iterable[Metric], node: str, into: dict[str, Metric], types: dict[str, str]
) -> None:
    """Add ``families`` to ``into`` with a ``node`` label on every sample."""
    for family in families:
        merged = into.get(family.name)
        if merged is None:
            merged = into[family.name] = Metric(family.name, family.documentation, family.type)
            types[family.name] = family.type
        elif types[family.name] != family.type:
            log.warning(
                "Metric %s is a %s on node %s but a %s elsewhere; left out for that node",
                family.name,
                family.type,
                node,
                types[family.name],
            )
            continue
        for sample in family.samples:
            merged.add_sample(sample.name, {**sample.labels, NODE_LABEL: node}, sample.value)


async def render_metrics(
    redis: Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    metrics: NodeMetrics | None = None,
    node: str | None = None,
) -> bytes:
    """The Prometheus text of the whole cluster; never raises for a dead dependency."""
    up = GaugeMetricFamily("plugind_up", "Whether a dependency answered", labels=["component"])
    families: list[Any] = [up]
    postgres = await probe(lambda: pool.fetchval("SELECT 1", timeout=2.0))
    up.add_metric(["postgres"], 1 if postgres.ok else 0)
    streams = await probe(lambda: _stream_metrics(redis, keys))
    up.add_metric(["redis"], 1 if streams.ok else 0)
    if streams.ok:
        families.extend(streams.value)
    merged: dict[str, Metric] = {}
    types: dict[str, str] = {}
    if metrics is not None and node is not None:
        _relabel(metrics.registry.collect(), node, merged, types)  # fresh, whatever Redis says
    published = await probe(lambda: read_metrics(redis, keys))
    if published.ok:  # else Redis is down, which plugind_up already says
        nodes = GaugeMetricFamily("plugind_nodes", "Nodes that published metrics lately")
        nodes.add_metric([], len(set(published.value) | ({node} if node else set())))
        families.append(nodes)
        for name, exposition in published.value.items():
            if name == node and metrics is not None:
                continue
            try:
                _relabel(text_string_to_metric_families(exposition), name, merged, types)
            except ValueError as exc:
                log.warning("Skipping the unreadable metrics of node %s: %s", name, exc)
    families.extend(merged.values())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry)
