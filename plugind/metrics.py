"""This node's metrics, fed where things happen: Prometheus conventions, nothing recomputed.

Counters end in ``_total``, durations are histograms in seconds, and every number is updated by
the code that does the work (a task's end, an install's end, a projector commit, an HTTP
request, a dependency check, a log record), or read at collection time from what the process
holds in memory anyway (its plugin pool, its consumers, its own CPU and memory). Nothing is
computed from Postgres.

One :class:`NodeMetrics` per daemon, with a registry of its own, so several daemons (or tests)
in one process never share or double-register collectors. Every node publishes its registry to
Redis (:mod:`plugind.bus.metrics_share`) and any ``api`` node serves them all, labelled by
``node`` (``plugind.http.metrics``), so ``--role worker`` nodes, which serve no HTTP, are
scraped through any ``api`` node, and every ``api`` node answers the same.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import psutil  # type: ignore[import-untyped]
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from plugind.outage import Outages

# no ``_created`` series: they double the output and nothing reads them
disable_created_metrics()  # type: ignore[no-untyped-call]

log = logging.getLogger(__name__)

TASK_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)
INSTALL_BUCKETS: Final = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
COMMIT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
HTTP_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
OUTCOMES: Final = {
    "task.succeeded": "succeeded",
    "task.failed": "failed",
    "task.timed_out": "timed_out",
    "plugin.installed": "installed",
    "plugin.install_failed": "failed",
}


class NodeMetrics:
    """The metric families of one node; see the module docstring."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry(auto_describe=True)
        self.tasks = Counter(
            "plugind_tasks",
            "Task requests this node ended, by plugin (author/name), action and outcome",
            ["plugin", "action", "outcome"],
            registry=registry,
        )
        self.task_duration = Histogram(
            "plugind_task_duration_seconds",
            "Time from picking a task up to its end, on this node",
            ["plugin", "action"],
            buckets=TASK_BUCKETS,
            registry=registry,
        )
        self.installs = Counter(
            "plugind_installs",
            "Installs this node ended, by outcome (installed, failed)",
            ["outcome"],
            registry=registry,
        )
        self.install_duration = Histogram(
            "plugind_install_duration_seconds",
            "Time an install took on this node, verification to launch",
            ["outcome"],
            buckets=INSTALL_BUCKETS,
            registry=registry,
        )
        self.dead_letters = Counter(
            "plugind_dead_letters",
            "Command entries this node moved to the dead letters",
            ["stream"],
            registry=registry,
        )
        self.projector_commit = Histogram(
            "plugind_projector_commit_duration_seconds",
            "Time a projector batch took to commit to Postgres on this node",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.projector_events = Counter(
            "plugind_projector_events",
            "Events this node's projector appended to the event log",
            registry=registry,
        )
        self.http_requests = Counter(
            "plugind_http_requests",
            "HTTP requests this node answered, by server (api, gateway), route and status",
            ["server", "method", "route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "plugind_http_request_duration_seconds",
            "Time to answer an HTTP request (until the response started, for streams)",
            ["server", "route"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.health_checks = Counter(
            "plugind_health_checks",
            "This node's own checks of its dependencies (every 2 s), by component and result",
            ["component", "result"],
            registry=registry,
        )
        self.log_messages = Counter(
            "plugind_log_messages",
            "Log records this process wrote at WARNING or above, by level",
            ["level"],
            registry=registry,
        )
        # series that alerts watch exist from the start (at 0), so increase() sees the first one
        for component in ("redis", "postgres"):
            for result in ("ok", "failed"):
                self.health_checks.labels(component, result)
        for level in ("warning", "error", "critical"):
            self.log_messages.labels(level)
        self._state = _State()
        registry.register(self._state)

    # -------------------------------------------------------------- fed by the hot path

    def task_ended(self, plugin_id: str, action: str, event: Any) -> None:
        outcome = OUTCOMES.get(event.__struct_config__.tag, "failed")
        self.tasks.labels(plugin_id, action, outcome).inc()
        self.task_duration.labels(plugin_id, action).observe(event.duration_ms / 1000)

    def install_ended(self, event: Any) -> None:
        outcome = OUTCOMES.get(event.__struct_config__.tag, "failed")
        self.installs.labels(outcome).inc()
        self.install_duration.labels(outcome).observe(event.duration_ms / 1000)

    # -------------------------------------------------------------- read at collection

    def watch(
        self,
        *,
        pool: Callable[[], Any] | None = None,
        consumers: Callable[[], Iterable[Any]] | None = None,
        outages: Outages | None = None,
    ) -> None:
        """Sources read at collection time: the plugin pool's snapshot, the consumers (in flight,
        taken over), the outage trackers."""
        self._state.pool = pool
        self._state.consumers = consumers
        self._state.outages = outages

    def log_handler(self) -> logging.Handler:
        """A handler that counts the records at WARNING and above (``error logs`` alerts)."""
        return _LogCounter(self)


class _LogCounter(logging.Handler):
    def __init__(self, metrics: NodeMetrics) -> None:
        super().__init__(logging.WARNING)
        self._counter = metrics.log_messages

    def emit(self, record: logging.LogRecord) -> None:
        self._counter.labels(record.levelname.lower()).inc()


class _State(Collector):
    """What the process holds in memory anyway, read when collected."""

    def __init__(self) -> None:
        self.pool: Callable[[], Any] | None = None
        self.consumers: Callable[[], Iterable[Any]] | None = None
        self.outages: Outages | None = None
        self._process = psutil.Process()
        self._limits = _Limits()

    def describe(self) -> Iterable[Any]:
        return []  # families vary with what is watched: never pre-registered by name

    def collect(self) -> Iterator[Any]:
        yield from self._pool()
        yield from self._consumers()
        yield from self._outages()
        yield from self._node()

    def _pool(self) -> Iterator[Any]:
        labels = ["plugin", "identifier"]
        processes = GaugeMetricFamily(
            "plugind_plugin_processes", "Live plugin processes", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "plugind_plugin_in_flight", "Sessions running in plugin processes", labels=labels
        )
        restarts = CounterMetricFamily(
            "plugind_plugin_restarts",
            "Plugin processes started again after one crashed or was killed",
            labels=labels,
        )
        rss = GaugeMetricFamily(
            "plugind_plugin_rss_bytes",
            "Resident memory of a plugin's processes and their children, last sample",
            labels=labels,
        )
        if self.pool is not None:
            for plugin in self.pool().plugins:
                ids = [plugin.identifier.split(":", 1)[0], plugin.identifier]
                processes.add_metric(ids, sum(1 for p in plugin.processes if p.alive))
                in_flight.add_metric(ids, plugin.in_flight)
                restarts.add_metric(ids, plugin.restarts)
                known = [p.rss for p in plugin.processes if p.rss is not None]
                if known:
                    rss.add_metric(ids, sum(known))
        yield from (processes, in_flight, restarts, rss)

    def _consumers(self) -> Iterator[Any]:
        in_flight = GaugeMetricFamily(
            "plugind_consumer_in_flight",
            "Command entries this node is running, by stream",
            labels=["stream"],
        )
        taken = CounterMetricFamily(
            "plugind_takeovers",
            "Entries this node took over from a silent (dead or frozen) node, by stream",
            labels=["stream"],
        )
        for consumer in self.consumers() if self.consumers is not None else ():
            in_flight.add_metric([consumer.stream], consumer.in_flight)
            taken.add_metric([consumer.stream], consumer.taken_over)
        yield from (in_flight, taken)

    def _outages(self) -> Iterator[Any]:
        if self.outages is None:
            return
        count = CounterMetricFamily(
            "plugind_dependency_outages",
            "Outages of a dependency this node saw (unreachable, then reachable again)",
            labels=["dependency"],
        )
        seconds = CounterMetricFamily(
            "plugind_dependency_outage_seconds",
            "Seconds a dependency was unreachable from this node, the current outage included",
            labels=["dependency"],
        )
        for dependency in self.outages:
            label = dependency.name.lower()
            count.add_metric([label], dependency.outages)
            seconds.add_metric([label], round(dependency.down_seconds, 3))
        yield from (count, seconds)

    def _node(self) -> Iterator[Any]:
        """The node's CPU and memory: the daemon and its plugin processes together."""
        cpu = CounterMetricFamily(
            "plugind_node_cpu_seconds",
            "CPU time of the daemon and its plugin processes (those ended included)",
        )
        memory = GaugeMetricFamily(
            "plugind_node_memory_bytes", "Resident memory of the daemon and its plugin processes"
        )
        memory_limit = GaugeMetricFamily(
            "plugind_node_memory_limit_bytes",
            "Memory the node may use: its cgroup's limit, else the machine's memory",
        )
        cpus = GaugeMetricFamily(
            "plugind_node_cpus", "CPUs the node may use: its cgroup's quota, else its affinity"
        )
        try:
            times = self._process.cpu_times()
            seconds = times.user + times.system + times.children_user + times.children_system
            rss = self._process.memory_info().rss
        except psutil.Error:
            return
        if self.pool is not None:
            for plugin in self.pool().plugins:
                for process in plugin.processes:
                    rss += process.rss or 0
                    seconds += _cpu_of(process.pid) if process.alive else 0.0
        cpu.add_metric([], seconds)
        memory.add_metric([], rss)
        memory_limit.add_metric([], self._limits.memory())
        cpus.add_metric([], self._limits.cpus())
        yield from (cpu, memory, memory_limit, cpus)


def _cpu_of(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


class _Limits:
    """The cgroup's memory limit and CPU quota (v2, then v1), read once a minute."""

    CGROUP: Final = Path("/sys/fs/cgroup")

    def __init__(self) -> None:
        self._read_at = -1e9
        self._memory = 0.0
        self._cpus = 1.0

    def memory(self) -> float:
        self._refresh()
        return self._memory

    def cpus(self) -> float:
        self._refresh()
        return self._cpus

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._read_at < 60:
            return
        self._read_at = now
        total = float(psutil.virtual_memory().total)
        limit = _number(self.CGROUP / "memory.max") or _number(
            self.CGROUP / "memory" / "memory.limit_in_bytes"
        )
        self._memory = min(limit, total) if limit else total
        cpus = float(len(os.sched_getaffinity(0)))
        quota = _cpu_quota(self.CGROUP)
        self._cpus = min(quota, cpus) if quota else cpus


def _number(path: Path) -> float | None:
    try:
        raw = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return float(raw) if raw.isdigit() else None  # "max": no limit


def _cpu_quota(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota.isdigit() and period.isdigit():
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    quota_v1 = _number(root / "cpu" / "cpu.cfs_quota_us")
    period_v1 = _number(root / "cpu" / "cpu.cfs_period_us")
    if quota_v1 and period_v1:
        return quota_v1 / period_v1
    return None
