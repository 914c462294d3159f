"""The plugin pool's numbers where operators see them: /health, ``plugind status``, /metrics.

``/health`` shows the pool of the daemon's own process. ``status`` and ``/metrics`` read what
every worker node publishes to Redis (``plugind.bus.nodes``), since the pool lives in another
process; the daemons here publish every 0.2 s so the tests need not wait for the default 5 s.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from e2e import EXAMPLE_CALC, run_cli
from prometheus_client.parser import text_string_to_metric_families

from plugind.bus.keys import Keys
from plugind.bus.nodes import NodeReport, publish, read_reports, withdraw
from plugind.client import Client
from plugind.config import Settings
from plugind.daemon import Daemon, running_daemon
from plugind.messages import Installed, TaskSucceeded
from plugind.package.difypkg import build_package
from plugind.runtime.pool import PluginStats, PoolSnapshot, ProcessStats
from plugind.runtime.pool_report import PluginReport, PoolReport, ProcessReport, pool_report

pytestmark = pytest.mark.anyio

EMPTY: dict[str, Any] = {
    "processes": 0,
    "in_flight": 0,
    "restarts": 0,
    "rss_bytes": None,
    "plugins": [],
}


@pytest.fixture(scope="module")
def calc_package() -> bytes:
    return build_package(EXAMPLE_CALC)


@pytest.fixture
async def daemon(settings: Settings, redis: Any) -> AsyncIterator[Daemon]:
    """The e2e daemon, reporting its pool every 0.2 s."""
    async with running_daemon(settings, shutdown_grace_s=5, report_interval_s=0.2) as d:
        yield d


async def install_and_add(client: Client, package: bytes) -> str:
    """Install calc and run one task on it, so its pool has one live process; its identifier."""
    installed = await client.wait(await client.install(package), timeout=300)
    assert isinstance(installed, Installed), installed
    rid = await client.invoke_tool("acme/calc", "calc", "add", {"a": 1, "b": 2}, user_id="u1")
    done = await client.wait(rid, timeout=60)
    assert isinstance(done, TaskSucceeded), done
    return installed.identifier


async def until(check: Any, timeout: float = 20.0) -> Any:
    """Poll ``check()`` until it returns something truthy: reports are periodic."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {check}")
        await anyio.sleep(0.1)


# ------------------------------------------------------------------ /health


async def test_health_shows_the_pool_of_its_process(
    daemon: Daemon, client: Client, calc_package: bytes, settings: Settings
) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.ports['api']}") as http:
        before = (await http.get("/health")).json()
        assert before["components"]["plugins"] == EMPTY

        identifier = await install_and_add(client, calc_package)
        response = await http.get("/health")
    assert response.status_code == 200
    plugins = response.json()["components"]["plugins"]
    assert (plugins["processes"], plugins["in_flight"], plugins["restarts"]) == (1, 0, 0)
    (calc,) = plugins["plugins"]
    assert calc["identifier"] == identifier and calc["plugin_id"] == "acme/calc"
    assert (calc["processes"], calc["in_flight"], calc["restarts"]) == (1, 0, 0)
    assert calc["consecutive_failures"] == 0
    (process,) = calc["instances"]
    assert process["slot"] == 0 and process["alive"] and isinstance(process["pid"], int)
    assert process["in_flight"] == 0 and process["uptime_s"] > 0
    assert process["memory_limit_bytes"] is None  # limits are opt-in

    # a process without the worker role has no pool to show, and says so
    async with (
        running_daemon(settings, roles=("api",), shutdown_grace_s=5) as api_only,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_only.ports['api']}") as http,
    ):
        body = (await http.get("/health")).json()
    assert body["status"] == "healthy"
    assert body["components"]["plugins"] is None


# ------------------------------------------------------------------ plugind status


async def test_status_shows_each_live_workers_pool(
    daemon: Daemon,
    client: Client,
    calc_package: bytes,
    settings: Settings,
    redis: aioredis.Redis,
) -> None:
    async def status() -> dict[str, Any]:
        _, out, _ = await run_cli(settings, "status")
        parsed: dict[str, Any] = orjson.loads(out)
        return parsed

    identifier = await install_and_add(client, calc_package)

    async def calc_is_running() -> dict[str, Any] | None:
        nodes = (await status())["nodes"]
        node = nodes.get(settings.node)
        # reports are periodic: one may be from while the process was starting (not live
        # yet) or while the task ran (in flight)
        if node is None or (node["plugins"]["processes"], node["plugins"]["in_flight"]) != (1, 0):
            return None
        return dict(node)

    node = await until(calc_is_running)
    assert node["version"] and node["at"].endswith("Z")
    pool = node["plugins"]
    assert (pool["processes"], pool["in_flight"], pool["restarts"]) == (1, 0, 0)
    (calc,) = pool["plugins"]
    assert calc["identifier"] == identifier and calc["processes"] == 1
    (process,) = calc["instances"]
    assert process["alive"] and isinstance(process["pid"], int)

    daemon.stop()  # a clean stop withdraws the node's report at once
    with anyio.fail_after(20):
        while await redis.exists(daemon.keys.node(settings.node)):
            await anyio.sleep(0.1)
    assert (await status())["nodes"] == {}


# ------------------------------------------------------------------ /metrics


def _samples(text: str) -> dict[tuple[str, str], float]:
    """``(sample name, plugin identifier) -> value`` of the plugin pool metrics."""
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("plugind_plugin_"):
            for sample in family.samples:
                found[sample.name, sample.labels["identifier"]] = sample.value
                assert set(sample.labels) == {"node", "plugin", "identifier"}
    return found


async def test_metrics_show_every_workers_pool(
    daemon: Daemon, client: Client, calc_package: bytes, settings: Settings
) -> None:
    identifier = await install_and_add(client, calc_package)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.ports['api']}") as http:

        async def sampled() -> str | None:
            text = (await http.get("/metrics")).text
            samples = _samples(text)
            # reports are periodic: one may be from while the process was starting (not
            # live yet) or while the task ran (in flight), or come before the first RSS sample
            settled = (
                samples.get(("plugind_plugin_processes", identifier)) == 1
                and samples.get(("plugind_plugin_in_flight", identifier)) == 0
                and ("plugind_plugin_rss_bytes", identifier) in samples
            )
            return text if settled else None

        text = await until(sampled)
    samples = _samples(text)
    assert samples["plugind_plugin_processes", identifier] == 1
    assert samples["plugind_plugin_in_flight", identifier] == 0
    assert samples["plugind_plugin_restarts_total", identifier] == 0
    assert samples["plugind_plugin_rss_bytes", identifier] > 1024 * 1024
    expected = f'identifier="{identifier}",node="{settings.node}",plugin="acme/calc"'
    assert f"plugind_plugin_processes{{{expected}}} 1.0" in text


# ------------------------------------------------------------------ the parts


def test_a_snapshot_becomes_a_report_with_named_fields() -> None:
    up = ProcessStats(
        slot=0,
        pid=101,
        alive=True,
        in_flight=2,
        uptime_s=12.34567,
        heartbeat_age_s=0.0004,
        rss=50_000_000,
        memory_limit=268_435_456,
    )
    starting = up._replace(
        slot=1, pid=102, alive=False, in_flight=0, uptime_s=None, heartbeat_age_s=None, rss=None
    )
    snapshot = PoolSnapshot(
        plugins=(
            PluginStats("acme/calc:0.1.0@abc", (up, starting), 2, 3, 1),
            PluginStats("acme/idle:1.0.0@def", (), 0, 0, 0),
        ),
        processes=1,
        in_flight=2,
        restarts=3,
    )
    assert pool_report(snapshot) == PoolReport(
        processes=1,
        in_flight=2,
        restarts=3,
        rss_bytes=50_000_000,
        plugins=[
            PluginReport(
                identifier="acme/calc:0.1.0@abc",
                plugin_id="acme/calc",
                processes=1,
                in_flight=2,
                restarts=3,
                consecutive_failures=1,
                rss_bytes=50_000_000,
                instances=[
                    ProcessReport(
                        slot=0,
                        pid=101,
                        alive=True,
                        in_flight=2,
                        uptime_s=12.346,
                        heartbeat_age_s=0.0,
                        rss_bytes=50_000_000,
                        memory_limit_bytes=268_435_456,
                    ),
                    ProcessReport(
                        slot=1,
                        pid=102,
                        alive=False,
                        in_flight=0,
                        uptime_s=None,
                        heartbeat_age_s=None,
                        rss_bytes=None,
                        memory_limit_bytes=268_435_456,
                    ),
                ],
            ),
            PluginReport(
                identifier="acme/idle:1.0.0@def",
                plugin_id="acme/idle",
                processes=0,
                in_flight=0,
                restarts=0,
                consecutive_failures=0,
                rss_bytes=None,  # nothing sampled is not zero bytes
                instances=[],
            ),
        ],
    )


def _report(node: str, processes: int = 0) -> NodeReport:
    pool = PoolReport(processes=processes, in_flight=0, restarts=0, rss_bytes=None, plugins=[])
    return NodeReport(node=node, at="2025-01-02T03:04:05.000006Z", version="1.2.3", pool=pool)


async def test_reports_expire_and_are_withdrawn(redis: aioredis.Redis, keys: Keys) -> None:
    await publish(redis, keys, _report("b", 2), ttl_ms=60_000)
    await publish(redis, keys, _report("a"), ttl_ms=300)
    assert await read_reports(redis, keys) == [_report("a"), _report("b", 2)]

    await anyio.sleep(0.5)  # "a" stopped reporting: its hash expired, its index entry is ignored
    assert await read_reports(redis, keys) == [_report("b", 2)]

    await withdraw(redis, keys, "b")
    assert await read_reports(redis, keys) == []
    assert await redis.zcard(keys.nodes) == 1  # only "a", dropped by writers after an hour


async def test_an_unreadable_report_is_skipped(redis: aioredis.Redis, keys: Keys) -> None:
    await publish(redis, keys, _report("good"), ttl_ms=60_000)
    await publish(redis, keys, _report("odd"), ttl_ms=60_000)
    await redis.hset(keys.node("odd"), "pool", b'{"processes": "many"}')
    assert await read_reports(redis, keys) == [_report("good")]
