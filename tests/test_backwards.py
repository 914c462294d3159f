"""Plugins calling back into Dify, end to end: real SDK plugins, a daemon, a fake of Dify.

One daemon for the module, pointed at the fake inner API (``fake_dify``), with two plugins
installed: ``acme/relayer`` (every permission it uses) and ``acme/bare`` (none). Tasks go in
as dify-api sends them (``/dispatch/…``) and come back with dify-api's parsing rules.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from backwards_env import (
    TENANT,
    BackwardsEnv,
    json_messages,
    relayer_env,
    text_messages,
)
from backwards_plugins import MODEL_PROVIDER, STORAGE_SIZE
from dify_wire import DifyApi, DifyRaised, StreamReply
from fake_dify import KEY

from plugind.messages import BackwardsInvoked, TaskFailed, TaskSucceeded

pytestmark = pytest.mark.anyio

READ_TIMEOUT = 2.0


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
        dify_inner_api_read_timeout=READ_TIMEOUT,
    ) as running:
        yield running


@pytest.fixture
async def api(env: BackwardsEnv) -> AsyncIterator[DifyApi]:
    client = env.api()
    yield client
    await client.aclose()


@pytest.fixture(autouse=True)
def _fresh_fake(env: BackwardsEnv) -> None:
    fake = env.fake
    fake.received.clear()
    fake.delay = fake.frame_delay = 0.0
    fake.fail.clear()
    fake.key = KEY


async def tool(api: DifyApi, tool_name: str, plugin: str = "relayer", **params: Any) -> StreamReply:
    return await api.dispatch(
        TENANT,
        "tool/invoke",
        f"acme/{plugin}",
        {"provider": plugin, "tool": tool_name, "credentials": {}, "tool_parameters": params},
        user_id="user-7",
    )


def raised(reply: StreamReply) -> DifyRaised:
    error = reply.raised()
    assert error.raised == "PluginInvokeError", error
    return error


async def backwards_events(env: BackwardsEnv, reply: StreamReply) -> list[BackwardsInvoked]:
    events = await env.events_of(reply.headers["x-plugind-request-id"])
    return [e for e in events if isinstance(e, BackwardsInvoked)]


# --------------------------------------------------------------------------------------------
# relayed to Dify


async def test_an_llm_stream_reaches_the_plugin_chunk_by_chunk(
    env: BackwardsEnv, api: DifyApi
) -> None:
    env.fake.frame_delay = 0.3
    reply = await tool(api, "ask", q="what is the answer?")
    assert text_messages(reply.data()) == env.fake.llm_words
    # each word left the plugin as it came from Dify, not all at the end
    times = [f.at for f in reply.frames if f.line.startswith("data:")]
    assert times[-1] - times[0] > 0.3 * (len(times) - 1) / 2
    [call] = env.fake.received
    assert call.path == "invoke/llm" and call.key == KEY
    body = call.body
    assert (body["tenant_id"], body["user_id"], body["type"]) == (TENANT, "user-7", "llm")
    assert (body["provider"], body["model"], body["stream"]) == (MODEL_PROVIDER, "m1", True)
    assert body["prompt_messages"][0]["content"] == "what is the answer?"
    [event] = await backwards_events(env, reply)
    assert (event.kind, event.target, event.outcome) == ("llm", f"{MODEL_PROVIDER}/m1", "ok")
    assert event.plugin_id == "acme/relayer" and event.duration_ms > 0
    assert "answer" not in event.target  # never the prompt


async def test_a_tool_call(env: BackwardsEnv, api: DifyApi) -> None:
    reply = await tool(api, "use_tool")
    assert json_messages(reply.data()) == [
        {"type": "text", "message": {"text": "time/current_time ran"}},
        {"type": "json", "message": {"json_object": {"got": {"zone": "UTC"}}}},
    ]
    [call] = env.fake.received
    assert call.path == "invoke/tool"
    assert (call.body["tool_type"], call.body["provider"], call.body["tool"]) == (
        "builtin",
        "time",
        "current_time",
    )
    [event] = await backwards_events(env, reply)
    assert (event.kind, event.target, event.outcome) == ("tool", "time/current_time", "ok")


async def test_answers_in_one_document(env: BackwardsEnv, api: DifyApi) -> None:
    embedded = await tool(api, "embed")
    assert json_messages(embedded.data()) == [{"embeddings": [[2.0, 0.5], [4.0, 0.5]]}]
    fetched = await tool(api, "fetch_app", app_id="app-3")
    assert json_messages(fetched.data()) == [{"app": {"id": "app-3", "mode": "chat"}}]
    assert env.fake.paths() == ["invoke/text-embedding", "fetch/app/info"]


async def test_an_error_from_dify_is_the_plugins_error(env: BackwardsEnv, api: DifyApi) -> None:
    env.fake.fail["invoke/llm"] = "the model's quota is exhausted"
    reply = await tool(api, "ask", q="hi")
    assert "the model's quota is exhausted" in raised(reply).description
    [event] = await backwards_events(env, reply)
    assert event.outcome == "error" and "quota is exhausted" in (event.error or "")


async def test_a_wrong_inner_api_key(env: BackwardsEnv, api: DifyApi) -> None:
    env.fake.key = "another-key"
    reply = await tool(api, "ask", q="hi")
    description = raised(reply).description
    assert "HTTP 404" in description and "DIFY_INNER_API_KEY" in description


async def test_dify_down_is_a_clear_error_at_once(env: BackwardsEnv, api: DifyApi) -> None:
    await env.fake.stop()
    try:
        started = time.monotonic()
        reply = await tool(api, "ask", q="hi")
        assert "unreachable" in raised(reply).description
        assert time.monotonic() - started < 5
    finally:
        assert env.fake_tg is not None
        await env.fake.start(env.fake_tg)


async def test_a_slow_dify_is_given_up_on_within_the_timeout(
    env: BackwardsEnv, api: DifyApi
) -> None:
    env.fake.delay = READ_TIMEOUT + 3
    started = time.monotonic()
    reply = await tool(api, "ask", q="hi")
    assert "did not answer in time" in raised(reply).description
    assert READ_TIMEOUT <= time.monotonic() - started < READ_TIMEOUT + 2.5


# --------------------------------------------------------------------------------------------
# refused before leaving plugind


async def test_calls_the_manifest_does_not_allow_are_refused(
    env: BackwardsEnv, api: DifyApi
) -> None:
    asked = await tool(api, "ask", plugin="bare", q="hi")
    assert (
        "permission denied, you need to enable llm access in plugin manifest"
        in raised(asked).description
    )
    stored = await tool(api, "store", plugin="bare", op="set", key="k", value="v")
    assert "enable storage access" in raised(stored).description
    used = await tool(api, "use_tool", plugin="bare")
    assert "enable tool access" in raised(used).description
    assert env.fake.received == []  # nothing reached Dify
    for reply, kind in ((asked, "llm"), (stored, "storage"), (used, "tool")):
        [event] = await backwards_events(env, reply)
        assert (event.kind, event.outcome, event.plugin_id) == (kind, "denied", "acme/bare")


# --------------------------------------------------------------------------------------------
# storage


async def test_storage_across_tasks(env: BackwardsEnv, api: DifyApi) -> None:
    async def store(**params: Any) -> list[Any]:
        return json_messages((await tool(api, "store", **params)).data())

    assert await store(op="exist", key="colour") == [{"exist": False}]
    assert await store(op="set", key="colour", value="blue") == [{"set": "colour"}]
    assert await store(op="get", key="colour") == [{"get": "blue"}]
    assert await store(op="exist", key="colour") == [{"exist": True}]
    assert await store(op="set", key="colour", value="green") == [{"set": "colour"}]
    assert await store(op="get", key="colour") == [{"get": "green"}]
    assert await store(op="del", key="colour") == [{"deleted": "colour"}]
    missing = await tool(api, "store", op="get", key="colour")
    assert "you have not set it" in raised(missing).description
    bad_key = await tool(api, "store", op="set", key="../etc", value="x")
    assert "path traversal" in raised(bad_key).description
    assert env.fake.received == []  # storage never leaves plugind


async def test_storage_quota(env: BackwardsEnv, api: DifyApi) -> None:
    too_big = await tool(api, "store", op="set", key="big", value="x" * (STORAGE_SIZE + 1))
    assert "greater than max storage size" in raised(too_big).description
    half = "y" * (STORAGE_SIZE // 2)
    for key in ("a", "b"):
        assert (await tool(api, "store", op="set", key=key, value=half)).data()
    over = await tool(api, "store", op="set", key="c", value="z")
    assert "greater than max storage size" in raised(over).description
    # replacing a value counts the difference, deleting frees its size
    assert (await tool(api, "store", op="set", key="a", value=half[:-1])).data()
    assert (await tool(api, "store", op="set", key="c", value="z")).data()
    for key in ("a", "b", "c"):
        assert (await tool(api, "store", op="del", key=key)).data()
    [event] = await backwards_events(env, too_big)
    assert (event.kind, event.target, event.outcome) == ("storage", "set", "error")


# --------------------------------------------------------------------------------------------
# an agent strategy


async def test_an_agent_strategy_asks_the_model_and_a_tool(env: BackwardsEnv, api: DifyApi) -> None:
    reply = await api.dispatch(
        TENANT,
        "agent_strategy/invoke",
        "acme/relayer",
        {
            "agent_strategy_provider": "thinker",
            "agent_strategy": "think",
            "agent_strategy_params": {"query": "what time is it?"},
        },
        conversation_id="conv-1",
        app_id="app-1",
        message_id="msg-1",
    )
    messages = reply.data()
    assert text_messages(messages) == [
        "the model said: The answer is 42.",
        "the tool said: time/current_time ran",
    ]
    assert json_messages(messages) == [{"done": True}]
    assert env.fake.paths() == ["invoke/llm", "invoke/tool"]
    assert env.fake.received[1].body["tool_parameters"] == {"question": "The answer is 42."}
    events = await env.events_of(reply.headers["x-plugind-request-id"])
    kinds = [(e.kind, e.outcome) for e in events if isinstance(e, BackwardsInvoked)]
    assert kinds == [("llm", "ok"), ("tool", "ok")]
    assert isinstance(events[-1], TaskSucceeded)


# --------------------------------------------------------------------------------------------
# last: restarts the daemon


async def test_storage_survives_a_restart(env: BackwardsEnv, api: DifyApi) -> None:
    reply = await tool(api, "store", op="set", key="kept", value="across restarts")
    assert reply.data()
    await env.restart()
    fresh = env.api()
    try:
        again = await tool(fresh, "store", op="get", key="kept")
        assert json_messages(again.data()) == [{"get": "across restarts"}]
        events = await env.events_of(again.headers["x-plugind-request-id"])
        assert not any(isinstance(e, TaskFailed) for e in events)
    finally:
        await fresh.aclose()
