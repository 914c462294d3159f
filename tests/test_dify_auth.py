"""``X-Api-Key`` on port 5002 (docs/dify.md): which routes need it, and what a refusal looks like.

The app is the daemon's :5002 app (read API plus the Dify routes) over ASGI, with real Redis
and Postgres. Without the key nothing runs: no command is published, no row is read.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from plugind.bus.keys import Keys
from plugind.config import Settings
from plugind.dify.app import dify_routes
from plugind.dify.deps import DifyDeps
from plugind.http.auth import needs_key
from plugind.http.read_api import create_read_app

pytestmark = pytest.mark.anyio

KEY = "s3cret-key"
OPEN = ["/health", "/health/check", "/metrics", "/api/v1/plugins/stats"]
TENANT_DATA = ["/api/v1/plugins", "/api/v1/tasks/r1", "/api/v1/events"]
DIFY = [
    ("GET", "/plugin/t1/management/list"),
    ("POST", "/plugin/t1/management/install/identifiers"),
    ("POST", "/plugin/t1/dispatch/tool/invoke"),
    ("GET", "/plugin/t1/asset/abc.svg"),
    ("GET", "/plugin/t1/no/such/route"),
]


def _app(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, api_key: str | None
) -> httpx.AsyncClient:
    settings = Settings(namespace=keys.namespace, api_key=api_key)
    deps = DifyDeps(redis=redis, keys=keys, pool=pool, settings=settings)
    app = create_read_app(
        redis=redis,
        pool=pool,
        keys=keys,
        version="1",
        api_key=api_key,
        extra_routes=dify_routes(deps),
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def http(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys
) -> AsyncIterator[httpx.AsyncClient]:
    async with _app(redis, pool, keys, KEY) as client:
        yield client


async def test_open_routes_need_no_key(http: httpx.AsyncClient) -> None:
    for path in OPEN:
        response = await http.get(path)
        assert response.status_code == 200, (path, response.text)
    assert (await http.get("/health/check")).json()["status"] == "ok"


async def test_tenant_data_and_the_dify_api_need_the_key(
    http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys
) -> None:
    body = json.dumps({"data": {"provider": "calc"}, "user_id": "u"})
    for headers in ({}, {"X-Api-Key": "wrong"}, {"X-Api-Key": KEY.upper()}, {"x-api-key": ""}):
        for path in TENANT_DATA:
            response = await http.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "unauthorized"
        for method, path in DIFY:
            response = await http.request(
                method,
                path,
                content=body,
                headers={"Content-Type": "application/json", "X-Plugin-ID": "acme/calc", **headers},
            )
            assert response.status_code == 401, (path, headers)
            envelope = response.json()
            assert envelope["code"] == -401 and envelope["data"] is None
            detail = json.loads(envelope["message"])
            assert detail["error_type"] == "PluginDaemonUnauthorizedError"
    for stream in (keys.tasks, keys.install):
        assert await redis.xlen(stream) == 0  # nothing was published

    authorised = {"X-Api-Key": KEY}
    for path in TENANT_DATA:
        response = await http.get(path, headers=authorised)
        assert response.status_code in (200, 404), (path, response.text)
    listed = await http.get("/plugin/t1/management/list", headers=authorised)
    assert listed.status_code == 200 and listed.json()["data"] == {"list": [], "total": 0}
    unknown = await http.get("/plugin/t1/no/such/route", headers=authorised)
    assert unknown.status_code == 404


async def test_without_a_configured_key_the_protected_routes_say_which_setting(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    async with _app(redis, pool, keys, None) as http:
        assert (await http.get("/health")).status_code == 200
        for headers in ({}, {"X-Api-Key": ""}, {"X-Api-Key": "anything"}):
            plugins = await http.get("/api/v1/plugins", headers=headers)
            assert plugins.status_code == 401
            assert "PLUGIND_API_KEY" in plugins.json()["error"]["message"]
            dify = await http.get("/plugin/t1/management/list", headers=headers)
            assert dify.status_code == 401
            assert "PLUGIND_API_KEY" in json.loads(dify.json()["message"])["message"]


def test_which_paths_need_the_key() -> None:
    assert not any(needs_key(p) for p in [*OPEN, "/", "/api/v1/plugins/stats/", "/pluginx"])
    assert all(needs_key(p) for p in [*TENANT_DATA, "/api/v1/plugins/", "/plugin/t/x"])
