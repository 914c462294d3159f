"""The read API over ASGI with real Redis and Postgres: health, stats, plugins, tasks, events."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.applications import Starlette

from plugind.bus.keys import Keys
from plugind.http.read_api import create_read_app
from plugind.messages import (
    ErrorInfo,
    EventFactory,
    Installed,
    ManifestSummary,
    TaskFailed,
    TaskResult,
    TaskStarted,
    TaskSucceeded,
    encode,
)
from plugind.metrics import NodeMetrics
from plugind.projections.migrate import migrate
from plugind.projections.projector import Projector

pytestmark = pytest.mark.anyio
ev = EventFactory("test-node")
KEY = "read-key"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    yield pool
    await pool.close()


def client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers={"X-Api-Key": KEY}
    )


@pytest.fixture
async def api(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_read_app(redis=redis, pool=pool, keys=keys, version="9.9.9", api_key=KEY)
    async with client(app) as c:
        yield c


async def project(redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, *events: object) -> None:
    for event in events:
        await redis.xadd(keys.events, {"event": encode(event)})  # type: ignore[arg-type]
    projector = Projector(redis, pool, keys, "node-a", block_ms=10)
    try:
        assert await projector.run_once() == len(events)
    finally:
        await projector.close()


def _task_events(rid: str, plugin: str, ms: float, ok: bool = True) -> list[object]:
    start = ev(
        TaskStarted,
        request_id=rid,
        tenant_id="t1",
        plugin_id=plugin,
        identifier=f"{plugin}:1.0.0@x",
        access="tool",
        action="invoke_tool",
        attempt=1,
    )
    if ok:
        end: object = ev(
            TaskSucceeded,
            request_id=rid,
            tenant_id="t1",
            plugin_id=plugin,
            result=TaskResult(chunks=[{"sum": 3}]),
            duration_ms=ms,
        )
    else:
        end = ev(
            TaskFailed,
            request_id=rid,
            tenant_id="t1",
            plugin_id=plugin,
            error=ErrorInfo("plugin_error", "boom"),
            duration_ms=ms,
        )
    return [start, end]


async def test_health_healthy(api: httpx.AsyncClient) -> None:
    response = await api.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["version"] == "9.9.9"
    assert body["timestamp"].endswith("Z")
    components = body["components"]
    assert components["redis"]["status"] == "up" and components["redis"]["latency_ms"] >= 0
    assert components["postgres"]["status"] == "up"
    assert components["projector"]["lag"] == 0 and components["projector"]["status"] == "up"


async def test_health_degraded_when_projector_lags(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    event = ev(
        TaskStarted,
        request_id="r",
        tenant_id="t",
        plugin_id="a/b",
        identifier="a/b:1@x",
        access="tool",
        action="invoke_tool",
        attempt=1,
    )
    await redis.xadd(keys.events, {"event": encode(event)})
    app = create_read_app(
        redis=redis, pool=pool, keys=keys, version="1", api_key=KEY, lag_threshold=0
    )
    async with client(app) as c:
        response = await c.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["components"]["projector"] == {
        "lag": 1,
        "status": "lagging",
        "threshold": 0,
        "position": None,
        "active": False,
    }


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("port_fixture", ["closed_port", "silent_port"])
async def test_health_unhealthy_names_postgres(
    redis: aioredis.Redis, keys: Keys, port_fixture: str, request: pytest.FixtureRequest
) -> None:
    port = request.getfixturevalue(port_fixture)
    dead = await asyncpg.create_pool(
        f"postgresql://postgres@127.0.0.1:{port}/none", min_size=0, max_size=1, timeout=30
    )
    try:
        app = create_read_app(redis=redis, pool=dead, keys=keys, version="1", api_key=KEY)
        async with client(app) as c:
            started = time.monotonic()
            response = await c.get("/health")
            elapsed = time.monotonic() - started
            stats = await c.get("/api/v1/plugins/stats") if port_fixture == "closed_port" else None
    finally:
        await dead.close()
    assert elapsed < 4
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["components"]["postgres"]["status"] == "down"
    assert body["components"]["postgres"]["error"]
    assert body["components"]["redis"]["status"] == "up"
    if stats is not None:
        assert stats.status_code == 503
        assert stats.json()["error"]["code"] == "database_unavailable"


async def test_health_unhealthy_names_redis(
    pool: asyncpg.Pool, keys: Keys, closed_port: int
) -> None:
    # no retries: redis-py would otherwise back off until the probe's deadline
    dead = aioredis.Redis(host="127.0.0.1", port=closed_port, retry=Retry(NoBackoff(), 0))
    try:
        app = create_read_app(redis=dead, pool=pool, keys=keys, version="1", api_key=KEY)
        async with client(app) as c:
            response = await c.get("/health")
            metrics = await c.get("/metrics")
    finally:
        await dead.aclose()
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["components"]["redis"]["status"] == "down"
    assert "Connect" in body["components"]["redis"]["error"]
    assert body["components"]["postgres"]["status"] == "up"
    assert body["components"]["projector"]["status"] == "unknown"
    assert metrics.status_code == 200
    assert 'plugind_up{component="redis"} 0.0' in metrics.text
    assert 'plugind_up{component="postgres"} 1.0' in metrics.text


async def test_stats(
    api: httpx.AsyncClient, redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    await project(
        redis,
        pool,
        keys,
        *_task_events("r1", "acme/calc", 10.0),
        *_task_events("r2", "acme/calc", 30.0),
        *_task_events("r3", "acme/other", 5.0, ok=False),
    )
    response = await api.get("/api/v1/plugins/stats", params={"window": "1h"})
    assert response.status_code == 200
    body = response.json()
    assert body["window_s"] == 3600.0
    assert body["overall"]["total"] == 3
    assert body["overall"]["counts"]["succeeded"] == 2
    assert body["overall"]["success_rate"] == pytest.approx(2 / 3)
    assert body["overall"]["duration_ms"]["p50"] == pytest.approx(10.0)
    assert {p["plugin_id"]: p["total"] for p in body["plugins"]} == {
        "acme/calc": 2,
        "acme/other": 1,
    }

    one = (await api.get("/api/v1/plugins/stats?plugin=acme/calc&window=900")).json()
    assert one["plugin"] == "acme/calc" and one["overall"]["total"] == 2
    assert one["overall"]["duration_ms"]["avg"] == pytest.approx(20.0)

    for query in ("window=soon", "window=-5m", "window=0", "plugin=nonsense"):
        bad = await api.get(f"/api/v1/plugins/stats?{query}")
        assert bad.status_code == 400, query
        assert bad.json()["error"]["code"] == "invalid_parameter"
        assert bad.json()["error"]["message"]


async def test_plugins_and_tasks(
    api: httpx.AsyncClient, redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    installed = ev(
        Installed,
        request_id="i1",
        tenant_id="t1",
        plugin_id="acme/calc",
        identifier="acme/calc:1.0.0@x",
        version="1.0.0",
        checksum="x",
        manifest=ManifestSummary(author="acme"),
        duration_ms=1.0,
    )
    await project(redis, pool, keys, installed, *_task_events("r1", "acme/calc", 7.0))

    plugins = (await api.get("/api/v1/plugins", params={"tenant_id": "t1"})).json()["plugins"]
    assert [(p["plugin_id"], p["version"], p["status"]) for p in plugins] == [
        ("acme/calc", "1.0.0", "installed"),
    ]
    assert (await api.get("/api/v1/plugins?tenant_id=other")).json() == {"plugins": []}
    assert (await api.get("/api/v1/plugins?status=weird")).status_code == 400

    task = await api.get("/api/v1/tasks/r1")
    assert task.status_code == 200
    assert task.json()["status"] == "succeeded"
    assert task.json()["result"] == {"chunks": [{"sum": 3}]}
    missing = await api.get("/api/v1/tasks/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert (await api.get("/api/v1/no-such-route")).json()["error"]["code"] == "not_found"


async def test_events_filters_and_pagination(
    api: httpx.AsyncClient, redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    await project(
        redis,
        pool,
        keys,
        *_task_events("r1", "acme/calc", 1.0),
        *_task_events("r2", "acme/other", 2.0),
        *_task_events("r3", "acme/calc:1.0.0@x", 3.0),
    )
    seen: list[int] = []
    after: int | None = None
    pages = 0
    while True:
        params = {"limit": "2"} | ({"after": str(after)} if after is not None else {})
        page = (await api.get("/api/v1/events", params=params)).json()
        seen += [e["position"] for e in page["events"]]
        pages += 1
        after = page["next"]
        if after is None:
            break
    assert seen == [1, 2, 3, 4, 5, 6] and pages == 3

    calc = (await api.get("/api/v1/events?plugin=acme/calc&type=task.succeeded")).json()
    assert [e["request_id"] for e in calc["events"]] == ["r1", "r3"]
    assert calc["next"] is None
    first = calc["events"][0]
    assert first["event"]["type"] == "task.succeeded" and len(first["hash"]) == 64
    assert first["at"].endswith("Z")

    by_request = (await api.get("/api/v1/events?request=r2")).json()["events"]
    assert [e["type"] for e in by_request] == ["task.started", "task.succeeded"]
    since = (await api.get("/api/v1/events?since=5")).json()["events"]
    assert [e["position"] for e in since] == [5, 6]
    by_time = (
        await api.get("/api/v1/events", params={"since": "2000-01-01T00:00:00Z", "tenant": "t1"})
    ).json()["events"]
    assert len(by_time) == 6
    for query in ("limit=0", "limit=1001", "after=x", "since=yesterday"):
        assert (await api.get(f"/api/v1/events?{query}")).status_code == 400, query


async def test_metrics_per_app(redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys) -> None:
    await project(redis, pool, keys, *_task_events("r1", "acme/calc", 4.0))
    await redis.xadd(keys.events, {"event": b"{}"})  # one event not projected yet
    for _ in range(2):  # two apps in one process must not clash over a global registry
        metrics = NodeMetrics()  # fed by the handlers; nothing is read from Postgres
        [*_, ended] = _task_events("r1", "acme/calc", 4.0)
        metrics.task_ended("acme/calc", "invoke_tool", ended)
        app = create_read_app(
            redis=redis, pool=pool, keys=keys, version="1", api_key=KEY, metrics=metrics, node="n1"
        )
        async with client(app) as c:
            response = await c.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        labels = 'action="invoke_tool",node="n1",outcome="succeeded",plugin="acme/calc"'
        assert f"plugind_tasks_total{{{labels}}} 1.0" in text
        assert "plugind_projector_lag 1.0" in text
        assert f'plugind_stream_length{{stream="{keys.events}"}} 3.0' in text


async def test_health_before_migrations(
    redis: aioredis.Redis, database_url: str, keys: Keys
) -> None:
    bare = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        app = create_read_app(redis=redis, pool=bare, keys=keys, version="1", api_key=KEY)
        async with client(app) as c:
            response = await c.get("/health")
    finally:
        await bare.close()
    body = response.json()
    assert body["components"]["postgres"]["status"] == "up"
    assert body["components"]["projector"]["migrated"] is False
