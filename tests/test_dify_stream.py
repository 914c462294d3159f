"""Live streams of the Dify dispatch routes, and what they answer to bad input.

One daemon for the module (calc and parrot installed once; a short task timeout so the timeout
frame comes quickly). Frames are timed as they come off a real socket.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from dify_wire import DifyApi, DifyEnv, DifyRaised, envelope_data, running_dify, stream_data
from e2e import EXAMPLE_CALC, REPO

from plugind.bus.codec import EVENT_FIELD
from plugind.bus.keys import Keys
from plugind.dify.stream import relay, terminal_error
from plugind.messages import (
    CommandDeadLettered,
    ErrorInfo,
    EventFactory,
    TaskFailed,
    TaskResult,
    TaskSucceeded,
    TaskTimedOut,
    encode,
)
from plugind.package.difypkg import build_package

pytestmark = pytest.mark.anyio

EXAMPLE_PARROT = REPO / "examples" / "plugins" / "parrot"
TENANT = "tenant-s"
TASK_TIMEOUT = 4.0
FRAME = re.compile(rb'data: \{"code":[^\n]*\}\n\n')


@pytest.fixture(scope="module")
async def env(
    admin_database_url: str, redis_url: str, shared_plugin_dir: Path
) -> AsyncIterator[DifyEnv]:
    async with running_dify(
        admin_database_url=admin_database_url,
        redis_url=redis_url,
        plugin_dir=shared_plugin_dir,
        packages=[build_package(EXAMPLE_CALC), build_package(EXAMPLE_PARROT)],
        tenant=TENANT,
        task_timeout=TASK_TIMEOUT,
    ) as running:
        yield running


@pytest.fixture
async def api(env: DifyEnv) -> AsyncIterator[DifyApi]:
    client = DifyApi(env.base_url, env.key)
    yield client
    await client.aclose()


def llm(words: list[str], delay_ms: int) -> dict[str, Any]:
    return {
        "provider": "parrot",
        "model_type": "llm",
        "model": "parrot-chat",
        "credentials": {},
        "prompt_messages": [{"role": "user", "content": " ".join(words)}],
        "model_parameters": {"delay_ms": delay_ms},
        "tools": None,
        "stop": None,
        "stream": True,
    }


def divide(a: float, b: float) -> dict[str, Any]:
    return {
        "provider": "calc",
        "tool": "divide",
        "credentials": {},
        "tool_parameters": {"a": a, "b": b},
    }


async def tasks_published(env: DifyEnv) -> int:
    length: Any = await env.redis.xlen(env.keys.tasks)
    return int(length)


def assert_only_frames(raw: bytes) -> None:
    """The body is nothing but ``data: <envelope>\\n\\n`` frames: no comments, no event lines."""
    assert FRAME.sub(b"", raw) == b"", raw[:500]


# --------------------------------------------------------------------------------------------
# live streaming


async def test_llm_chunks_arrive_as_the_plugin_writes_them(api: DifyApi) -> None:
    words = [f"w{i}" for i in range(8)]
    delay_s = 0.15
    reply = await api.dispatch(TENANT, "llm/invoke", "acme/parrot", llm(words, int(delay_s * 1000)))
    assert_only_frames(reply.raw)
    frames = [frame for frame in reply.frames if frame.line]
    chunks = reply.data()
    assert "".join(c["delta"]["message"]["content"] for c in chunks) == " ".join(words)
    assert len(frames) == len(words) + 1  # a frame per word, then the one with the usage
    first, last = frames[0].at, frames[-1].at
    # The plugin waits delay_s before each word: a relay that waited for the end would deliver
    # every frame at once. The first frame must come about 7 delays before the last.
    assert last - first > (len(words) - 2) * delay_s, [round(f.at, 3) for f in frames]
    gaps = [b.at - a.at for a, b in itertools.pairwise(frames[:-1])]
    assert sum(gap > delay_s / 2 for gap in gaps) >= len(gaps) // 2, gaps  # spread, not a burst


async def test_a_raising_tool_is_one_typed_error_frame(api: DifyApi) -> None:
    reply = await api.dispatch(TENANT, "tool/invoke", "acme/calc", divide(1, 0))
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert_only_frames(reply.raw)
    assert reply.raw.count(b"data: ") == 1
    raised = reply.raised()
    assert (raised.raised, raised.plugin_error_type) == ("PluginInvokeError", "ZeroDivisionError")


async def test_a_task_over_its_timeout_ends_with_the_timeout_frame(api: DifyApi) -> None:
    started = time.monotonic()
    reply = await api.dispatch(TENANT, "llm/invoke", "acme/parrot", llm(["slow"] * 10, 800))
    took = time.monotonic() - started
    assert_only_frames(reply.raw)
    lines = [line for line in reply.lines if line]
    assert 1 <= len(lines) - 1 <= 6  # some words made it before the timeout
    raised = reply.raised()
    assert raised.raised == "PluginDaemonInternalServerError"
    assert raised.description == "killed by timeout"
    assert TASK_TIMEOUT - 0.5 < took < TASK_TIMEOUT + 5


async def test_a_client_that_goes_away_stops_the_relay(
    api: DifyApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = anyio.Event()

    async def watched(*args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        try:
            async for frame in relay(*args, **kwargs):
                yield frame
        finally:
            ended.set()

    monkeypatch.setattr("plugind.dify.dispatch.relay", watched)
    body = json.dumps({"user_id": "u", "data": llm(["tick"] * 30, 100)}).encode()
    path = f"/plugin/{TENANT}/dispatch/llm/invoke"
    async with api.http.stream("POST", path, content=body, headers=api.headers("acme/parrot")) as r:
        async for line in r.aiter_lines():
            if line:
                break  # one frame, then hang up
    left = time.monotonic()
    with anyio.fail_after(2):
        await ended.wait()
    assert time.monotonic() - left < 2  # the plugin would still be talking for ~3 s


# --------------------------------------------------------------------------------------------
# tenants and plugins


async def test_a_plugin_the_tenant_has_not_installed_is_plugin_not_found(
    api: DifyApi, env: DifyEnv
) -> None:
    before = await tasks_published(env)
    installed = env.identifiers["acme/calc"]
    other_version = installed.replace("0.1.0@", "0.2.0@")
    for tenant, plugin_id in (
        (TENANT, "acme/nothing"),  # no such plugin
        ("someone-else", "acme/calc"),  # installed, but for another tenant
        ("someone-else", installed),  # ... also when named by its full identifier
        (TENANT, other_version),  # a version the tenant does not have
        (TENANT, "not-a-plugin-id"),
    ):
        reply = await api.dispatch(tenant, "tool/invoke", plugin_id, divide(1, 1))
        assert reply.status == 200, (tenant, plugin_id)
        assert_only_frames(reply.raw)
        raised = reply.raised()
        assert raised.raised == "PluginNotFoundError", (tenant, plugin_id, raised)
    assert await tasks_published(env) == before  # nothing reached the workers


async def test_the_full_identifier_of_the_installed_version_works(
    api: DifyApi, env: DifyEnv
) -> None:
    reply = await api.dispatch(TENANT, "tool/invoke", env.identifiers["acme/calc"], divide(6, 3))
    assert {"quotient": 2.0} in [m["message"].get("json_object") for m in reply.data()]


# --------------------------------------------------------------------------------------------
# bad requests


async def test_malformed_bodies_get_a_bad_request_envelope(api: DifyApi, env: DifyEnv) -> None:
    before = await tasks_published(env)
    path = f"/plugin/{TENANT}/dispatch/tool/invoke"
    for body in (
        b"",
        b"{not json",
        b"[1, 2]",
        b'{"user_id": "u"}',  # no data
        b'{"user_id": "u", "data": [1]}',  # data is not an object
        b'{"user_id": 7, "data": {}}',
    ):
        response = await api.http.post(path, content=body, headers=api.headers("acme/calc"))
        assert response.status_code == 200, body
        envelope = json.loads(response.content)
        assert envelope["code"] == -400 and envelope["data"] is None, body
        with pytest.raises(Exception) as caught:
            envelope_data(response.content)
        assert getattr(caught.value, "raised", None) == "PluginDaemonBadRequestError", body
        assert json.loads(envelope["message"])["message"], body
    no_plugin = await api.http.post(path, content=b'{"data": {}}', headers={"X-Api-Key": env.key})
    assert json.loads(no_plugin.content)["code"] == -400
    assert "X-Plugin-ID" in json.loads(json.loads(no_plugin.content)["message"])["message"]
    assert await tasks_published(env) == before


async def test_unknown_dispatch_routes(api: DifyApi, env: DifyEnv) -> None:
    before = await tasks_published(env)
    for route in ("tool/explode", "llm", "nothing/at/all"):
        response = await api.http.post(
            f"/plugin/{TENANT}/dispatch/{route}",
            content=b'{"data": {}}',
            headers=api.headers("acme/calc"),
        )
        assert response.status_code == 404, route
        envelope = json.loads(response.content)
        assert envelope["code"] == -404
        assert json.loads(envelope["message"])["error_type"] == "PluginDaemonNotFoundError"
    wrong_method = await api.http.get(
        f"/plugin/{TENANT}/dispatch/tool/invoke", headers=api.headers("acme/calc")
    )
    assert wrong_method.status_code in (404, 405)
    assert await tasks_published(env) == before


async def test_no_or_wrong_key_is_refused_and_nothing_is_published(env: DifyEnv) -> None:
    before = await tasks_published(env)
    body = json.dumps({"user_id": "u", "data": divide(1, 1)}).encode()
    async with httpx.AsyncClient(base_url=env.base_url) as anonymous:
        for headers in (
            {"X-Plugin-ID": "acme/calc"},
            {"X-Plugin-ID": "acme/calc", "X-Api-Key": "wrong"},
            {"X-Plugin-ID": "acme/calc", "X-Api-Key": ""},
        ):
            response = await anonymous.post(
                f"/plugin/{TENANT}/dispatch/tool/invoke",
                content=body,
                headers={"Content-Type": "application/json", **headers},
            )
            assert response.status_code == 401, headers
    assert await tasks_published(env) == before


# --------------------------------------------------------------------------------------------
# the write gateway's SSE carries the chunks too


async def test_the_gateway_sse_relays_live_chunks(env: DifyEnv) -> None:
    gateway = f"http://127.0.0.1:{env.daemon.ports['gateway']}"
    async with httpx.AsyncClient(
        base_url=gateway, headers={"X-Api-Key": env.key}, timeout=60
    ) as http:
        accepted = await http.post(
            "/api/v1/tasks",
            json={
                "tenant_id": TENANT,
                "plugin_id": "acme/parrot",
                "access": "model",
                "action": "invoke_llm",
                "payload": llm(["a", "b", "c", "d", "e"], 150),
                "stream": True,
            },
        )
        assert accepted.status_code == 202, accepted.text
        rid = accepted.json()["request_id"]
        seen: list[tuple[float, str, str]] = []
        started = time.monotonic()
        async with http.stream("GET", f"/api/v1/tasks/{rid}/events") as stream:
            name = ""
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    seen.append((time.monotonic() - started, name, line.removeprefix("data: ")))
    names = [name for _at, name, _data in seen]
    assert names[0] == "task.started" or names[0] == "chunk"
    assert names[-1] == "task.succeeded"
    chunks = [json.loads(data) for _at, name, data in seen if name == "chunk"]
    assert "".join(c["delta"]["message"]["content"] for c in chunks) == "a b c d e"
    chunk_times = [at for at, name, _data in seen if name == "chunk"]
    assert chunk_times[-1] - chunk_times[0] > 0.4, chunk_times  # they came as written
    terminal = json.loads(seen[-1][2])
    assert terminal["result"]["chunks"] == chunks


# --------------------------------------------------------------------------------------------
# the relay alone, on cases a healthy worker does not produce


async def _collect(redis: Any, keys: Keys, rid: str, deadline_s: float = 5.0) -> list[bytes]:
    frames = relay(redis, keys, rid, deadline_s=deadline_s, idle_check_s=0.05)
    return [frame async for frame in frames]


async def test_relay_of_a_request_that_ended_without_output(redis: Any, keys: Keys) -> None:
    """A dead-lettered command writes no ``end`` entry: the done marker ends the relay, after
    the chunks that did arrive."""
    events = EventFactory("node-t")
    rid = "dead-1"
    await redis.xadd(keys.out(rid), {"chunk": b'{"n":1}'})
    dead = events(
        CommandDeadLettered,
        request_id=rid,
        tenant_id="t",
        stream=keys.tasks,
        entry_id="1-0",
        deliveries=5,
        error=ErrorInfo(code="plugin_crashed", message="it kept crashing"),
    )
    entry_id = await redis.xadd(keys.events, {EVENT_FIELD: encode(dead)})
    await redis.set(keys.done(rid), entry_id)
    frames = b"".join(await _collect(redis, keys, rid))
    assert_only_frames(frames)
    lines = frames.decode().split("\n")
    assert stream_data(lines[:1]) == [{"n": 1}]
    with pytest.raises(DifyRaised) as raised:
        stream_data(lines)
    assert raised.value.raised == "PluginDaemonInternalServerError"
    assert "it kept crashing" in raised.value.description


async def test_relay_gives_the_timeout_frame_at_its_deadline(redis: Any, keys: Keys) -> None:
    started = time.monotonic()
    frames = await _collect(redis, keys, "never-1", deadline_s=0.3)
    assert 0.25 < time.monotonic() - started < 2
    with pytest.raises(DifyRaised) as raised:
        stream_data(b"".join(frames).decode().split("\n"))
    assert (raised.value.raised, raised.value.description) == (
        "PluginDaemonInternalServerError",
        "killed by timeout",
    )


async def test_relay_maps_each_outcome() -> None:
    events = EventFactory("node-t")
    common: dict[str, Any] = {"request_id": "r", "tenant_id": "t", "plugin_id": "a/b"}
    failed = {
        code: terminal_error(
            events(TaskFailed, **common, error=ErrorInfo(code=code, message=code), duration_ms=1)
        )
        for code in ("not_installed", "unknown_plugin", "plugin_crashed", "timeout")
    }
    assert {code: err.error_type for code, err in failed.items() if err} == {
        "not_installed": "PluginNotFoundError",
        "unknown_plugin": "PluginNotFoundError",
        "plugin_crashed": "PluginDaemonInternalServerError",
        "timeout": "PluginDaemonInternalServerError",
    }
    timed_out = terminal_error(events(TaskTimedOut, **common, timeout_s=1, duration_ms=1))
    assert timed_out is not None and timed_out.message == "killed by timeout"
    ok = events(TaskSucceeded, **common, result=TaskResult(chunks=[]), duration_ms=1)
    assert terminal_error(ok) is None
