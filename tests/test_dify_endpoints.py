"""Plugin endpoints: Dify's management routes and the public ``/e/{hook_id}/…``, end to end.

One daemon for the module with ``acme/relayer`` (an endpoint group: GET ``/hello``, POST
``/echo``, GET ``/stream``; a secret ``api_key`` and a ``greeting``) and ``acme/bare`` (no
endpoint permission), pointed at the fake of Dify's inner API, which encrypts secrets by
reversing them behind ``enc:``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from backwards_env import API_KEY, TENANT, BackwardsEnv, relayer_env
from dify_wire import DifyApi, DifyRaised, envelope_data

from plugind.projections._db import connect
from plugind.projections.rebuild import read_models_equal_rebuild

pytestmark = pytest.mark.anyio

MAX_REQUEST = 4096
SECRET = "sk-secret-123"


@pytest.fixture(scope="module")
async def env(
    admin_database_url: str,
    redis_url: str,
    shared_plugin_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[BackwardsEnv]:
    async with relayer_env(
        admin_database_url=admin_database_url,
        redis_url=redis_url,
        plugin_dir=shared_plugin_dir,
        workdir=tmp_path_factory.mktemp("plugins"),
        endpoint_max_request_size=MAX_REQUEST,
    ) as running:
        yield running


@pytest.fixture
async def api(env: BackwardsEnv) -> AsyncIterator[DifyApi]:
    client = env.api()
    yield client
    await client.aclose()


async def call(api: DifyApi, method: str, path: str, **options: Any) -> Any:
    """``data`` of the answer to ``/plugin/{tenant}/endpoint/<path>`` (or ``/<path>``)."""
    where = path[1:] if path.startswith("/") else f"endpoint/{path}"
    response = await api.http.request(
        method, f"/plugin/{TENANT}/{where}", headers={"X-Api-Key": API_KEY}, **options
    )
    assert response.status_code == 200, response.text
    return envelope_data(response.content)


async def refused(api: DifyApi, method: str, path: str, **options: Any) -> DifyRaised:
    try:
        data = await call(api, method, path, **options)
    except DifyRaised as exc:
        return exc
    raise AssertionError(f"{path} succeeded: {data!r}")


async def set_up(env: BackwardsEnv, api: DifyApi, name: str, **settings: Any) -> dict[str, Any]:
    """Set up an endpoint of acme/relayer and return it as the list shows it."""
    body = {
        "user_id": "user-1",
        "plugin_unique_identifier": env.identifiers["acme/relayer"],
        "settings": settings,
        "name": name,
    }
    assert await call(api, "POST", "setup", json=body) is True
    listed = await call(api, "GET", "list", params={"page": 1, "page_size": 100})
    [endpoint] = [e for e in listed if e["name"] == name]
    return dict(endpoint)


async def remove(api: DifyApi, endpoint: dict[str, Any]) -> None:
    assert await call(api, "POST", "remove", json={"endpoint_id": endpoint["id"]}) is True


def hook(env: BackwardsEnv, endpoint: dict[str, Any], path: str) -> str:
    return f"{env.base_url}/e/{endpoint['hook_id']}{path}"


async def test_set_up_list_and_call(env: BackwardsEnv, api: DifyApi) -> None:
    endpoint = await set_up(env, api, "hello", api_key=SECRET, greeting="hi")
    assert endpoint["settings"] == {"api_key": "sk*********23", "greeting": "hi"}
    assert endpoint["enabled"] is True and endpoint["plugin_id"] == "acme/relayer"
    assert endpoint["expired_at"].startswith("2050-01-01")
    assert {(e["method"], e["path"]) for e in endpoint["declaration"]["endpoints"]} == {
        ("GET", "/hello"),
        ("POST", "/echo"),
        ("GET", "/stream"),
    }
    assert [s["name"] for s in endpoint["declaration"]["settings"]] == ["api_key", "greeting"]
    by_plugin = await call(
        api, "GET", "list/plugin", params={"plugin_id": "acme/relayer", "page": 1, "page_size": 9}
    )
    assert [e["id"] for e in by_plugin] == [endpoint["id"]]
    # the secret went to Dify to be encrypted, and only its ciphertext is kept
    [encrypt] = [r for r in env.fake.received if r.path == "invoke/encrypt"]
    assert (encrypt.body["opt"], encrypt.body["identity"]) == ("encrypt", endpoint["id"])
    assert encrypt.body["data"] == {"api_key": SECRET}
    conn = await connect(env.database_url)
    try:
        kept = await conn.fetchval(
            "SELECT secrets::text FROM endpoint_secrets WHERE endpoint_id = $1", endpoint["id"]
        )
        logged = await conn.fetch(
            "SELECT payload::text FROM event_log WHERE type LIKE 'endpoint.%'"
        )
    finally:
        await conn.close()
    assert orjson.loads(kept) == {"api_key": "enc:" + SECRET[::-1]}
    assert logged and not any(SECRET in row["payload"] for row in logged)

    async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
        response = await http.get(
            hook(env, endpoint, "/hello"),
            params={"q": "1"},
            headers={"X-Forwarded-For": "10.0.0.1", "X-Real-IP": "10.0.0.2", "X-Custom": "c"},
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    seen = response.json()
    assert seen == {
        "greeting": "hi",
        "api_key": SECRET,  # decrypted by Dify for the call
        "path": "/hello",
        "q": "1",
        "hook_id": endpoint["hook_id"],
        "hook_url": hook(env, endpoint, "/hello"),
        "forwarded": None,
        "real_ip": None,
        "custom": "c",
    }
    await remove(api, endpoint)


async def test_post_and_a_streamed_body(env: BackwardsEnv, api: DifyApi) -> None:
    endpoint = await set_up(env, api, "echo", api_key="k")
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
        echoed = await http.post(hook(env, endpoint, "/echo"), content=b"abc\x00def")
        assert echoed.status_code == 201
        assert echoed.content == b"fed\x00cba"
        assert echoed.headers["x-echo-length"] == "7"
        arrivals: list[tuple[float, bytes]] = []
        started = time.monotonic()
        async with http.stream("GET", hook(env, endpoint, "/stream")) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/plain")
            async for part in streamed.aiter_raw():
                arrivals.append((time.monotonic() - started, part))
    assert b"".join(p for _at, p in arrivals) == b"part-0\npart-1\npart-2\npart-3\n"
    assert arrivals[-1][0] - arrivals[0][0] > 0.45  # written as the plugin yielded them
    await remove(api, endpoint)


async def test_disabled_removed_and_unknown_hooks_are_404(env: BackwardsEnv, api: DifyApi) -> None:
    endpoint = await set_up(env, api, "switch", api_key="k")
    listed = await call(api, "GET", "/management/list", params={"page": 1, "page_size": 9})
    [relayer] = [p for p in listed["list"] if p["plugin_id"] == "acme/relayer"]
    assert (relayer["endpoints_setups"], relayer["endpoints_active"]) == (1, 1)
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
        url = hook(env, endpoint, "/hello")
        assert (await http.get(url)).status_code == 200
        assert await call(api, "POST", "disable", json={"endpoint_id": endpoint["id"]}) is True
        disabled = await http.get(url)
        assert disabled.status_code == 404
        detail = json.loads(disabled.json()["message"])
        assert detail["error_type"] == "PluginDaemonNotFoundError"
        listed = await call(api, "GET", "/management/list", params={"page": 1, "page_size": 9})
        [relayer] = [p for p in listed["list"] if p["plugin_id"] == "acme/relayer"]
        assert (relayer["endpoints_setups"], relayer["endpoints_active"]) == (1, 0)
        assert await call(api, "POST", "enable", json={"endpoint_id": endpoint["id"]}) is True
        assert (await http.get(url)).status_code == 200
        unknown = await http.post(f"{env.base_url}/e/{'0' * 32}/hello", content=b"x")
        assert unknown.status_code == 404
        not_served = await http.get(hook(env, endpoint, "/nowhere"))
        assert not_served.status_code == 404  # the plugin's own answer: no such endpoint
        await remove(api, endpoint)
        assert (await http.get(url)).status_code == 404
    assert await call(api, "GET", "list", params={"page": 1, "page_size": 9}) == []
    gone = await refused(api, "POST", "enable", json={"endpoint_id": endpoint["id"]})
    assert gone.raised == "PluginDaemonNotFoundError"


async def test_update_keeps_an_untouched_secret(env: BackwardsEnv, api: DifyApi) -> None:
    endpoint = await set_up(env, api, "before", api_key=SECRET, greeting="hi")
    update = {
        "endpoint_id": endpoint["id"],
        "user_id": "user-1",
        "name": "after",
        "settings": {**endpoint["settings"], "greeting": "hello"},  # the secret as listed
    }
    assert await call(api, "POST", "update", json=update) is True
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
        seen = (await http.get(hook(env, endpoint, "/hello"))).json()
        assert (seen["api_key"], seen["greeting"]) == (SECRET, "hello")
        update["settings"] = {"api_key": "sk-another-456", "greeting": "hey"}
        assert await call(api, "POST", "update", json=update) is True
        seen = (await http.get(hook(env, endpoint, "/hello"))).json()
        assert (seen["api_key"], seen["greeting"]) == ("sk-another-456", "hey")
    [listed] = await call(api, "GET", "list", params={"page": 1, "page_size": 9})
    assert (listed["name"], listed["settings"]["api_key"]) == ("after", "sk**********56")
    await remove(api, endpoint)


async def test_what_is_refused(env: BackwardsEnv, api: DifyApi) -> None:
    relayer, bare = env.identifiers["acme/relayer"], env.identifiers["acme/bare"]
    base = {"user_id": "u", "name": "n"}
    missing = await refused(
        api, "POST", "setup", json={**base, "plugin_unique_identifier": relayer, "settings": {}}
    )
    assert missing.raised == "PluginDaemonBadRequestError"
    assert "missing required setting: api_key" in missing.description
    wrong_type = await refused(
        api,
        "POST",
        "setup",
        json={**base, "plugin_unique_identifier": relayer, "settings": {"api_key": 3}},
    )
    assert "setting api_key is not a string" in wrong_type.description
    denied = await refused(
        api, "POST", "setup", json={**base, "plugin_unique_identifier": bare, "settings": {}}
    )
    assert denied.raised == "PluginPermissionDeniedError"
    not_installed = relayer.replace("0.1.0", "9.9.9")
    absent = await refused(
        api, "POST", "setup", json={**base, "plugin_unique_identifier": not_installed}
    )
    assert absent.raised == "PluginNotFoundError"
    endpoint = await set_up(env, api, "small", api_key="k")
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
        too_big = await http.post(hook(env, endpoint, "/echo"), content=b"x" * (MAX_REQUEST + 1))
        assert too_big.status_code == 413
        fits = await http.post(hook(env, endpoint, "/echo"), content=b"x" * MAX_REQUEST)
        assert fits.status_code == 201
    await remove(api, endpoint)


async def test_endpoint_events_rebuild_to_the_same_read_model(env: BackwardsEnv) -> None:
    entries: Any = await env.redis.xrange(env.keys.events)
    assert entries
    conn = await connect(env.database_url)
    try:
        counted = await conn.fetch("SELECT type, count(*) FROM event_log GROUP BY type")
        diff = await read_models_equal_rebuild(conn)
    finally:
        await conn.close()
    types = {row["type"] for row in counted}
    assert {"endpoint.set_up", "endpoint.removed", "endpoint.disabled"} <= types
    assert diff.ok, diff.to_dict()
