"""What Dify's console does with a plugin, end to end, over a real socket.

Upload the package → decode it → install from identifiers → poll the install task until
``success`` → list → tools and models → invoke → uninstall → list without it; and a package
that cannot start, whose install task ends ``failed`` with the reason. Every call is shaped as
dify-api's client classes shape it and every answer parsed with dify-api's rules; the event log
(read back through ``/api/v1/events``) shows each install, task and uninstall Dify asked for.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from dify_wire import DifyApi, DifyEnv, envelope_data, running_dify
from e2e import EXAMPLE_CALC, REPO
from plugin_factory import ECHO, package_bytes, write_plugin

from plugind.package.difypkg import build_package

pytestmark = pytest.mark.anyio

EXAMPLE_PARROT = REPO / "examples" / "plugins" / "parrot"
TENANT = "4c5a7a0e-5d0b-4c7f-9a38-2f3b9d1e6c11"  # Dify's tenant ids are UUIDs


@pytest.fixture(scope="module")
async def env(
    admin_database_url: str, redis_url: str, shared_plugin_dir: Path
) -> AsyncIterator[DifyEnv]:
    async with running_dify(
        admin_database_url=admin_database_url,
        redis_url=redis_url,
        plugin_dir=shared_plugin_dir,
        packages=[],
        tenant=TENANT,
    ) as running:
        yield running


@pytest.fixture
async def api(env: DifyEnv) -> AsyncIterator[DifyApi]:
    client = DifyApi(env.base_url, env.key)
    yield client
    await client.aclose()


async def console(api: DifyApi, method: str, path: str, **options: Any) -> Any:
    """One management call as ``BasePluginClient._request_with_plugin_daemon_response``."""
    headers = {"X-Api-Key": api.key}
    if "json" in options:
        headers["Content-Type"] = "application/json"
        options["content"] = json.dumps(options.pop("json")).encode()
    response = await api.http.request(
        method, f"/plugin/{TENANT}/management/{path}", headers=headers, **options
    )
    assert response.status_code == 200, response.text
    return envelope_data(response.content)


async def upload(api: DifyApi, package: bytes) -> str:
    decoded = await console(
        api,
        "POST",
        "install/upload/package",
        files={"dify_pkg": ("dify_pkg", package, "application/octet-stream")},
        data={"verify_signature": "false"},
    )
    identifier: str = decoded["unique_identifier"]
    return identifier


async def install(api: DifyApi, identifiers: list[str]) -> dict[str, Any]:
    """install_from_identifiers, then poll the task as the console does until it ends."""
    started = await console(
        api,
        "POST",
        "install/identifiers",
        json={"plugin_unique_identifiers": identifiers, "source": "package", "metas": [{}]},
    )
    assert started["all_installed"] is False and started["task_id"], started
    deadline = time.monotonic() + 300
    while True:
        task: dict[str, Any] = await console(api, "GET", f"install/tasks/{started['task_id']}")
        if task["status"] in ("success", "failed"):
            return task
        assert task["status"] in ("pending", "running"), task
        assert time.monotonic() < deadline, task
        await anyio.sleep(0.25)


async def test_upload_install_list_invoke_uninstall(api: DifyApi, env: DifyEnv) -> None:
    started_at = time.monotonic()
    calc = await upload(api, build_package(EXAMPLE_CALC))
    parrot = await upload(api, build_package(EXAMPLE_PARROT))
    decoded = await console(
        api, "GET", "decode/from_identifier", json={"plugin_unique_identifier": calc}
    )
    assert decoded["manifest"]["name"] == "calc"

    task = await install(api, [calc, parrot])
    assert task["status"] == "success", task
    assert [(p["plugin_unique_identifier"], p["status"]) for p in task["plugins"]] == [
        (calc, "success"),
        (parrot, "success"),
    ]

    listed = await console(api, "GET", "list", params={"page": 1, "page_size": 256})
    assert {p["plugin_unique_identifier"] for p in listed["list"]} == {calc, parrot}
    installations = {p["plugin_id"]: p["installation_id"] for p in listed["list"]}

    tools = await console(api, "GET", "tools", params={"page": 1, "page_size": 256})
    assert [(t["plugin_id"], t["provider"]) for t in tools] == [("acme/calc", "calc")]
    models = await console(api, "GET", "models", params={"page": 1, "page_size": 256})
    assert [(m["plugin_id"], m["provider"]) for m in models] == [("acme/parrot", "parrot")]

    # a workflow runs the tool (PluginToolManager.invoke)
    reply = await api.dispatch(
        TENANT,
        "tool/invoke",
        "acme/calc",
        {
            "provider": "calc",
            "tool": "add",
            "credentials": {},
            "credential_type": "api-key",
            "tool_parameters": {"a": 2, "b": 3},
        },
        conversation_id=None,
        app_id=None,
        message_id=None,
    )
    assert reply.status == 200
    assert any(json.dumps(d).find('"sum": 5') >= 0 for d in reply.data()), reply.lines

    removed = await console(
        api, "POST", "uninstall", json={"plugin_installation_id": installations["acme/calc"]}
    )
    assert removed is True
    listed = await console(api, "GET", "list", params={"page": 1, "page_size": 256})
    assert [p["plugin_id"] for p in listed["list"]] == ["acme/parrot"]
    assert await console(api, "GET", "tools", params={"page": 1, "page_size": 256}) == []
    gone = await api.dispatch(TENANT, "tool/invoke", "acme/calc", {"provider": "calc"})
    assert gone.raised().raised == "PluginNotFoundError"

    # the event log recorded what Dify asked for, in order
    response = await api.http.get(
        "/api/v1/events",
        params={"tenant": TENANT, "limit": 1000},
        headers={"X-Api-Key": api.key},
    )
    assert response.status_code == 200, response.text
    events = response.json()["events"]
    installed = [e for e in events if e["type"] == "plugin.installed"]
    assert {e["event"]["identifier"] for e in installed} == {calc, parrot}
    assert {e["request_id"] for e in installed} == {
        f"{task['id']}:0",
        f"{task['id']}:1",
    }
    assert any(e["type"] == "task.succeeded" and e["plugin_id"] == "acme/calc" for e in events)
    assert [e["event"]["plugin_id"] for e in events if e["type"] == "plugin.uninstalled"] == [
        "acme/calc"
    ]
    assert time.monotonic() - started_at < 300


async def test_a_package_that_cannot_start_fails_its_install_task(
    api: DifyApi, tmp_path: Path
) -> None:
    broken = write_plugin(tmp_path / "broken", name="broken", tools={"echo": ECHO})
    (broken / "tools" / "echo.py").unlink()  # the SDK cannot import the tool: no start
    identifier = await upload(api, package_bytes(broken))
    task = await install(api, [identifier])
    assert task["status"] == "failed", task
    (plugin,) = task["plugins"]
    assert plugin["status"] == "failed" and plugin["plugin_id"] == "acme/broken"
    assert "echo.py" in plugin["message"], plugin["message"]
    listed = await console(api, "GET", "list", params={"page": 1, "page_size": 256})
    assert "acme/broken" not in {p["plugin_id"] for p in listed["list"]}


async def test_without_the_key_nothing_happens(api: DifyApi, env: DifyEnv) -> None:
    before = await env.redis.xlen(env.keys.install)
    body = json.dumps(
        {
            "plugin_unique_identifiers": ["acme/calc:0.1.0@" + "c" * 64],
            "source": "package",
            "metas": [{}],
        }
    )
    for headers in ({}, {"X-Api-Key": "wrong"}, {"X-Api-Key": api.key + "x"}):
        response = await api.http.post(
            f"/plugin/{TENANT}/management/install/identifiers",
            content=body,
            headers={"Content-Type": "application/json", **headers},
        )
        assert response.status_code == 401
        envelope = response.json()
        assert envelope["code"] == -401 and envelope["data"] is None
        assert json.loads(envelope["message"])["error_type"] == "PluginDaemonUnauthorizedError"
    assert await env.redis.xlen(env.keys.install) == before
