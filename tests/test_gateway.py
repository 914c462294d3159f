"""The write gateway over real HTTP, in front of a whole daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from e2e import EXAMPLE_CALC, eventually

from plugind.config import Settings
from plugind.daemon import Daemon
from plugind.package.difypkg import build_package

pytestmark = pytest.mark.anyio


@pytest.fixture
async def http(daemon: Daemon) -> AsyncIterator[httpx.AsyncClient]:
    base = f"http://127.0.0.1:{daemon.ports['gateway']}"
    async with httpx.AsyncClient(
        base_url=base, headers={"X-Api-Key": "test-key"}, timeout=120
    ) as client:
        yield client


async def test_requests_without_the_key_are_refused(daemon: Daemon) -> None:
    base = f"http://127.0.0.1:{daemon.ports['gateway']}"
    async with httpx.AsyncClient(base_url=base) as anonymous:
        for headers in ({}, {"X-Api-Key": "wrong"}):
            response = await anonymous.post("/api/v1/tasks", json={}, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"


async def test_upload_install_invoke_and_follow(http: httpx.AsyncClient) -> None:
    data = build_package(EXAMPLE_CALC)
    uploaded = await http.post(
        "/api/v1/packages", content=data, headers={"Content-Type": "application/octet-stream"}
    )
    assert uploaded.status_code == 201, uploaded.text
    body = uploaded.json()
    assert body["identifier"].startswith("acme/calc:0.1.0@")
    assert "calc/add" in body["manifest"]["tools"]

    accepted = await http.post(
        "/api/v1/plugins/install", json={"identifier": body["identifier"], "tenant_id": "t1"}
    )
    assert accepted.status_code == 202, accepted.text
    rid = accepted.json()["request_id"]

    # the install's events as server-sent events, ending with its terminal event
    names = []
    async with http.stream("GET", f"/api/v1/tasks/{rid}/events") as stream:
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
    assert names[0] == "plugin.install_started"
    assert names[-1] == "plugin.installed", names

    task = {
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "access": "tool",
        "action": "invoke_tool",
        "user_id": "u1",
        "payload": {
            "provider": "calc",
            "tool": "multiply",
            "tool_parameters": {"a": 6, "b": 7},
            "credentials": {},
        },
    }
    done = await http.post("/api/v1/tasks?wait=60", json=task)
    assert done.status_code == 200, done.text
    event = done.json()
    assert event["type"] == "task.succeeded"
    assert {"product": 42} in [
        c["message"].get("json_object") for c in event["result"]["chunks"]
    ], event


async def test_bad_requests_get_clear_errors(http: httpx.AsyncClient) -> None:
    missing = await http.post("/api/v1/tasks", json={"plugin_id": "a/b"})
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "malformed_command"
    assert "access" in missing.json()["error"]["message"]

    not_json = await http.post("/api/v1/tasks", content=b"{nope")
    assert not_json.status_code == 400

    garbage = await http.post("/api/v1/packages", content=b"not a zip")
    assert garbage.status_code == 400
    assert garbage.json()["error"]["code"] == "invalid_package"

    unknown = await http.post(
        "/api/v1/plugins/install", json={"identifier": "a/b:1.0.0@" + "0" * 64}
    )
    assert unknown.status_code == 404

    accepted = await http.delete("/api/v1/plugins/nobody/nothing?tenant_id=t9")
    assert accepted.status_code == 202
    rid = accepted.json()["request_id"]
    async with http.stream("GET", f"/api/v1/tasks/{rid}/events") as stream:
        data = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
    last = orjson.loads(data[-1].removeprefix("data: "))
    assert last["type"] == "command.rejected"
    assert last["error"]["code"] == "not_installed"


async def test_events_of_a_finished_request_come_from_the_log(
    http: httpx.AsyncClient, settings: Settings, daemon: Daemon, redis: Any
) -> None:
    data = build_package(EXAMPLE_CALC)
    sha = (await http.post("/api/v1/packages", content=data)).json()["sha256"]
    rid = (await http.post("/api/v1/plugins/install", json={"sha256": sha})).json()["request_id"]
    assert settings.database_url is not None
    await eventually(
        settings.database_url,
        "SELECT type FROM event_log WHERE request_id = $1 AND type = 'plugin.installed'",
        rid,
    )
    await eventually(
        settings.database_url,
        "SELECT 1 FROM projection_checkpoints WHERE last_position >= "
        "(SELECT max(position) FROM event_log WHERE request_id = $1)",
        rid,
    )
    await redis.xtrim(daemon.keys.events, maxlen=0)  # only the log has them now
    async with http.stream("GET", f"/api/v1/tasks/{rid}/events") as stream:
        lines = [line async for line in stream.aiter_lines()]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    ids = [line.removeprefix("id: ") for line in lines if line.startswith("id: ")]
    assert names[0] == "plugin.install_started" and names[-1] == "plugin.installed"
    assert names.count("plugin.installed") == 1 and len(set(ids)) == len(ids)
    assert "plugin.install_progress" in names


async def test_multipart_upload_and_size_limit(http: httpx.AsyncClient, settings: Settings) -> None:
    data = build_package(EXAMPLE_CALC)
    uploaded = await http.post(
        "/api/v1/packages", files={"file": ("calc.difypkg", data, "application/zip")}
    )
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["identifier"].startswith("acme/calc:")

    too_big = await http.post("/api/v1/packages", content=b"x" * (settings.max_package_size + 1))
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "payload_too_large"
