"""Dify's dispatch routes against real plugins, as dify-api calls them and reads the answers.

One daemon for the module, with three plugins installed once for the tenant: the calc tool
example, the parrot model example (every model type) and a "toolbox" written here (an agent
strategy, a tool with runtime parameters and a dynamic-select parameter). Each test posts what
dify-api's client classes post (``api/core/plugin/impl/*.py``) over a real socket and parses the
stream with dify-api's rules (``dify_wire``).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from dify_wire import DifyApi, DifyEnv, running_dify
from e2e import EXAMPLE_CALC, REPO
from plugin_factory import ICON, SDK_REQUIREMENT

from plugind.bus.codec import EVENT_FIELD
from plugind.dify.access import ROUTES
from plugind.messages import TaskSucceeded, decode_event
from plugind.package.difypkg import build_package

pytestmark = pytest.mark.anyio

EXAMPLE_PARROT = REPO / "examples" / "plugins" / "parrot"
TENANT = "tenant-1"


def write_toolbox(dest: Path) -> Path:
    """A plugin with an agent strategy and a tool that has runtime and dynamic-select params."""
    files = {
        "manifest.yaml": """\
            version: 0.1.0
            type: plugin
            author: acme
            name: toolbox
            label:
              en_US: Toolbox
            description:
              en_US: An agent strategy and a tool with dynamic parameters, for the tests.
            icon: icon.svg
            created_at: "2025-01-01T00:00:00Z"
            resource:
              memory: 268435456
            plugins:
              tools:
                - provider/toolbox.yaml
              agent_strategies:
                - provider/agent.yaml
            meta:
              version: 0.0.1
              arch: [amd64, arm64]
              runner:
                language: python
                version: "3.12"
                entrypoint: main
            """,
        "main.py": """\
            from dify_plugin import DifyPluginEnv, Plugin

            plugin = Plugin(DifyPluginEnv())

            if __name__ == "__main__":
                plugin.run()
            """,
        "requirements.txt": SDK_REQUIREMENT + "\n",
        "_assets/icon.svg": ICON,
        "provider/toolbox.yaml": """\
            identity:
              author: acme
              name: toolbox
              label:
                en_US: Toolbox
              description:
                en_US: Tools with dynamic parameters.
              icon: icon.svg
            credentials_for_provider:
              token:
                type: secret-input
                required: false
                label:
                  en_US: Token
            tools:
              - tools/paint.yaml
            extra:
              python:
                source: provider/toolbox.py
            """,
        "provider/toolbox.py": """\
            from typing import Any

            from dify_plugin import ToolProvider
            from dify_plugin.errors.tool import ToolProviderCredentialValidationError


            class ToolboxProvider(ToolProvider):
                def _validate_credentials(self, credentials: dict[str, Any]) -> None:
                    if credentials.get("token") == "bad":
                        raise ToolProviderCredentialValidationError("the token is bad")
            """,
        "tools/paint.yaml": """\
            identity:
              name: paint
              author: acme
              label:
                en_US: Paint
            description:
              human:
                en_US: Paints in a colour chosen from a list the plugin fetches.
              llm: Paints.
            parameters:
              - name: colour
                type: dynamic-select
                form: form
                required: true
                label:
                  en_US: Colour
                human_description:
                  en_US: The colour.
            extra:
              python:
                source: tools/paint.py
            """,
        "tools/paint.py": """\
            from collections.abc import Generator
            from typing import Any

            from dify_plugin import Tool
            from dify_plugin.entities import I18nObject, ParameterOption
            from dify_plugin.entities.tool import ToolInvokeMessage, ToolParameter


            class PaintTool(Tool):
                def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage]:
                    yield self.create_text_message(f"painted {tool_parameters.get('colour')}")

                def _get_runtime_parameters(self) -> list[ToolParameter]:
                    return [
                        ToolParameter(
                            name="shade",
                            label=I18nObject(en_US="Shade"),
                            human_description=I18nObject(en_US="How dark"),
                            type=ToolParameter.ToolParameterType.STRING,
                            form=ToolParameter.ToolParameterForm.FORM,
                        )
                    ]

                def fetch_parameter_options(self, parameter: str) -> list[ParameterOption]:
                    names = ["red", "green"] if parameter == "colour" else []
                    return [ParameterOption(value=n, label=I18nObject(en_US=n)) for n in names]
            """,
        "provider/agent.yaml": """\
            identity:
              author: acme
              name: echo_agent
              label:
                en_US: Echo agent
              description:
                en_US: An agent strategy that thinks out loud.
              icon: icon.svg
            strategies:
              - strategies/echo.yaml
            """,
        "strategies/echo.yaml": """\
            identity:
              name: echo
              author: acme
              label:
                en_US: Echo
            description:
              en_US: Repeats the query, then answers with its length.
            parameters:
              - name: query
                type: string
                required: true
                label:
                  en_US: Query
            extra:
              python:
                source: strategies/echo.py
            """,
        "strategies/echo.py": """\
            from collections.abc import Generator

            from dify_plugin.entities.agent import AgentInvokeMessage
            from dify_plugin.interfaces.agent import AgentStrategy


            class EchoStrategy(AgentStrategy):
                def _invoke(self, parameters: dict) -> Generator[AgentInvokeMessage]:
                    query = str(parameters.get("query", ""))
                    yield self.create_text_message(f"thinking about {query}")
                    yield self.create_json_message({"length": len(query)})
            """,
    }
    for name, text in files.items():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return dest


@pytest.fixture(scope="module")
async def env(
    admin_database_url: str,
    redis_url: str,
    shared_plugin_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[DifyEnv]:
    toolbox = write_toolbox(tmp_path_factory.mktemp("toolbox"))
    packages = [build_package(p) for p in (EXAMPLE_CALC, EXAMPLE_PARROT, toolbox)]
    async with running_dify(
        admin_database_url=admin_database_url,
        redis_url=redis_url,
        plugin_dir=shared_plugin_dir,
        packages=packages,
        tenant=TENANT,
    ) as running:
        yield running


@pytest.fixture
async def api(env: DifyEnv) -> AsyncIterator[DifyApi]:
    client = DifyApi(env.base_url, env.key)
    yield client
    await client.aclose()


def _model(data: dict[str, Any], model_type: str, model: str) -> dict[str, Any]:
    return {
        "provider": "parrot",
        "model_type": model_type,
        "model": model,
        "credentials": {"api_key": "k"},
        **data,
    }


# --------------------------------------------------------------------------------------------
# tool


async def test_tool_invoke(api: DifyApi) -> None:
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
        app_id="app-1",
        message_id=None,
    )
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    messages = reply.data()
    assert [m["type"] for m in messages] == ["json", "text"]
    assert messages[0]["message"] == {"json_object": {"sum": 5}}
    assert messages[1]["message"] == {"text": "5"}


async def test_tool_validate_credentials(api: DifyApi) -> None:
    ok = await api.dispatch(
        TENANT,
        "tool/validate_credentials",
        "acme/toolbox",
        {"provider": "toolbox", "credentials": {"token": "good"}},
    )
    assert ok.data() == [{"result": True}]
    bad = await api.dispatch(
        TENANT,
        "tool/validate_credentials",
        "acme/toolbox",
        {"provider": "toolbox", "credentials": {"token": "bad"}},
    )
    raised = bad.raised()
    assert raised.raised == "PluginInvokeError"
    assert raised.plugin_error_type == "ToolProviderCredentialValidationError"


async def test_tool_get_runtime_parameters(api: DifyApi, env: DifyEnv) -> None:
    reply = await api.dispatch(
        TENANT,
        "tool/get_runtime_parameters",
        "acme/toolbox",
        {"provider": "toolbox", "tool": "paint", "credentials": {}},
        conversation_id=None,
        app_id=None,
        message_id=None,
    )
    assert reply.status == 200
    # dify-plugin 0.10.2 has an executor for this action but no route to it, so the plugin only
    # ends the session: no frame, which dify-api reads as "no runtime parameters" ([]).
    assert reply.data() == []
    started = await _events_of(env, reply.headers["x-plugind-request-id"])
    assert [(e.type, e.action) for e in started if e.type == "task.started"] == [
        ("task.started", "get_tool_runtime_parameters")
    ]
    assert started[-1].type == "task.succeeded"


async def test_a_raising_tool_gives_the_plugin_error_type(api: DifyApi) -> None:
    reply = await api.dispatch(
        TENANT,
        "tool/invoke",
        "acme/calc",
        {
            "provider": "calc",
            "tool": "divide",
            "credentials": {},
            "tool_parameters": {"a": 1, "b": 0},
        },
    )
    assert reply.status == 200
    [line] = [line for line in reply.lines if line]
    envelope = json.loads(line.removeprefix("data: "))
    assert envelope["code"] == -500 and envelope["data"] is None
    outer = json.loads(envelope["message"])
    assert outer["error_type"] == "PluginInvokeError"
    inner = json.loads(outer["message"])
    assert inner["error_type"] == "ZeroDivisionError"
    assert "cannot divide 1 by zero" in inner["message"]
    raised = reply.raised()
    assert (raised.raised, raised.plugin_error_type) == ("PluginInvokeError", "ZeroDivisionError")


# --------------------------------------------------------------------------------------------
# model


async def test_llm_invoke_streams_chunks(api: DifyApi) -> None:
    reply = await api.dispatch(
        TENANT,
        "llm/invoke",
        "acme/parrot",
        _model(
            {
                "prompt_messages": [
                    {"role": "system", "content": "be a parrot"},
                    {"role": "user", "content": "polly wants a biscuit"},
                ],
                "model_parameters": {"delay_ms": 0},
                "tools": None,
                "stop": None,
                "stream": True,
            },
            "llm",
            "parrot-chat",
        ),
    )
    chunks = reply.data()
    text = "".join(c["delta"]["message"]["content"] for c in chunks)
    assert text == "polly wants a biscuit"
    assert chunks[-1]["delta"]["finish_reason"] == "stop"
    assert chunks[-1]["delta"]["usage"]["completion_tokens"] == 4


async def test_llm_error_mid_stream_keeps_the_chunks_before_it(api: DifyApi) -> None:
    reply = await api.dispatch(
        TENANT,
        "llm/invoke",
        "acme/parrot",
        _model(
            {
                "prompt_messages": [{"role": "user", "content": "one two ratelimit three"}],
                "model_parameters": {"delay_ms": 0},
                "tools": None,
                "stop": None,
                "stream": True,
            },
            "llm",
            "parrot-chat",
        ),
    )
    lines = [line for line in reply.lines if line]
    assert len(lines) == 3  # "one", " two", then the error frame
    assert [c["delta"]["message"]["content"] for c in json_data(lines[:2])] == ["one", " two"]
    raised = reply.raised()
    assert raised.raised == "InvokeRateLimitError"
    assert "out of breath" in raised.description


def json_data(lines: list[str]) -> list[Any]:
    return [json.loads(line.removeprefix("data: "))["data"] for line in lines]


async def test_llm_num_tokens(api: DifyApi) -> None:
    reply = await api.dispatch(
        TENANT,
        "llm/num_tokens",
        "acme/parrot",
        _model(
            {"prompt_messages": [{"role": "user", "content": "a b c"}], "tools": None},
            "llm",
            "parrot-chat",
        ),
    )
    assert reply.data() == [{"num_tokens": 3}]


async def test_text_embedding(api: DifyApi) -> None:
    data = _model({"texts": ["hello", "hello world"]}, "text-embedding", "parrot-embed")
    reply = await api.dispatch(
        TENANT, "text_embedding/invoke", "acme/parrot", {**data, "input_type": "document"}
    )
    [result] = reply.data()
    assert result["model"] == "parrot-embed"
    first, second = result["embeddings"]
    assert len(first) == 16 and first != second
    assert abs(sum(x * x for x in first) - 1) < 1e-9
    again = await api.dispatch(
        TENANT, "text_embedding/invoke", "acme/parrot", {**data, "input_type": "query"}
    )
    assert again.data()[0]["embeddings"] == result["embeddings"]  # deterministic
    counted = await api.dispatch(TENANT, "text_embedding/num_tokens", "acme/parrot", data)
    assert counted.data() == [{"num_tokens": [1, 2]}]


async def test_rerank(api: DifyApi) -> None:
    reply = await api.dispatch(
        TENANT,
        "rerank/invoke",
        "acme/parrot",
        _model(
            {
                "query": "red bird",
                "docs": ["a red car", "the red bird", "blue sky"],
                "score_threshold": 0.1,
                "top_n": None,
            },
            "rerank",
            "parrot-rerank",
        ),
    )
    [result] = reply.data()
    assert [(d["index"], d["score"]) for d in result["docs"]] == [(1, 1.0), (0, 0.5)]


async def test_tts_and_speech2text(api: DifyApi) -> None:
    tts = await api.dispatch(
        TENANT,
        "tts/invoke",
        "acme/parrot",
        _model(
            {"tenant_id": TENANT, "content_text": "pretty bird", "voice": "whistle"},
            "tts",
            "parrot-voice",
        ),
    )
    parts = tts.data()
    assert len(parts) == 3  # the header, then one chunk per word, each its own frame
    audio = b"".join(bytes.fromhex(p["result"]) for p in parts)
    assert audio == b"PARROT/whistle:pretty bird"
    voices = await api.dispatch(
        TENANT,
        "tts/model/voices",
        "acme/parrot",
        _model({"language": "zh-Hans"}, "tts", "parrot-voice"),
    )
    assert voices.data() == [{"voices": [{"name": "Whistle", "value": "whistle"}]}]
    heard = await api.dispatch(
        TENANT,
        "speech2text/invoke",
        "acme/parrot",
        _model({"file": audio.hex()}, "speech2text", "parrot-ear"),
    )
    assert heard.data() == [{"result": "pretty bird"}]


async def test_moderation(api: DifyApi) -> None:
    for text, flagged in (("polly wants a cracker", True), ("polly wants a biscuit", False)):
        reply = await api.dispatch(
            TENANT,
            "moderation/invoke",
            "acme/parrot",
            _model({"text": text}, "moderation", "parrot-guard"),
        )
        assert reply.data() == [{"result": flagged}]


async def test_provider_and_model_credentials(api: DifyApi) -> None:
    ok = await api.dispatch(
        TENANT,
        "model/validate_provider_credentials",
        "acme/parrot",
        {"provider": "parrot", "credentials": {"api_key": "fine"}},
        user_id=None,  # dify-api leaves user_id out when it has none
    )
    assert ok.data() == [{"result": True, "credentials": {"api_key": "fine"}}]
    refused = await api.dispatch(
        TENANT,
        "model/validate_provider_credentials",
        "acme/parrot",
        {"provider": "parrot", "credentials": {"api_key": "invalid"}},
    )
    raised = refused.raised()
    assert raised.raised == "CredentialsValidateFailedError"
    assert "invalid" in raised.description
    model_ok = await api.dispatch(
        TENANT,
        "model/validate_model_credentials",
        "acme/parrot",
        _model({}, "llm", "parrot-chat"),
    )
    assert model_ok.data()[0]["result"] is True
    model_refused = await api.dispatch(
        TENANT,
        "model/validate_model_credentials",
        "acme/parrot",
        {**_model({}, "text-embedding", "parrot-embed"), "credentials": {"api_key": "invalid"}},
    )
    assert model_refused.raised().raised == "CredentialsValidateFailedError"


async def test_model_schema(api: DifyApi) -> None:
    reply = await api.dispatch(
        TENANT, "model/schema", "acme/parrot", _model({}, "llm", "parrot-chat")
    )
    [answer] = reply.data()
    schema = answer["model_schema"]
    assert schema["model"] == "parrot-chat" and schema["model_type"] == "llm"
    assert "delay_ms" in [rule["name"] for rule in schema["parameter_rules"]]


# --------------------------------------------------------------------------------------------
# agent strategy, dynamic select


async def test_agent_strategy_invoke(api: DifyApi) -> None:
    reply = await api.dispatch(
        TENANT,
        "agent_strategy/invoke",
        "acme/toolbox",
        {
            "agent_strategy_provider": "echo_agent",
            "agent_strategy": "echo",
            "agent_strategy_params": {"query": "crackers"},
        },
        conversation_id="conv-1",
        app_id="app-1",
        message_id="msg-1",
        context={},
    )
    messages = reply.data()
    assert [m["type"] for m in messages] == ["text", "json"]
    assert messages[0]["message"]["text"] == "thinking about crackers"
    assert messages[1]["message"]["json_object"] == {"length": 8}


async def test_dynamic_select_fetch_parameter_options(api: DifyApi) -> None:
    reply = await api.dispatch(
        TENANT,
        "dynamic_select/fetch_parameter_options",
        "acme/toolbox",
        {
            "provider": "toolbox",
            "credentials": {},
            "provider_action": "paint",
            "parameter": "colour",
        },
    )
    [answer] = reply.data()
    assert [option["value"] for option in answer["options"]] == ["red", "green"]


# --------------------------------------------------------------------------------------------
# what the command and the event log carry


async def test_the_dispatch_is_a_task_command_with_the_context_passed_through(
    api: DifyApi, env: DifyEnv
) -> None:
    reply = await api.dispatch(
        TENANT,
        "agent_strategy/invoke",
        "acme/toolbox",
        {
            "agent_strategy_provider": "echo_agent",
            "agent_strategy": "echo",
            "agent_strategy_params": {"query": "x"},
        },
        conversation_id="conv-9",
        app_id="app-9",
        message_id="msg-9",
        endpoint_id="ep-9",
        context={"trace": "t-9"},
    )
    assert reply.data()
    rid = reply.headers["x-plugind-request-id"]
    entries: Any = await env.redis.xrange(env.keys.tasks)
    commands = [json.loads(fields[b"cmd"]) for _id, fields in entries]
    [command] = [c for c in commands if c["request_id"] == rid]
    assert command["type"] == "task" and command["stream"] is True
    assert (command["tenant_id"], command["plugin_id"]) == (TENANT, "acme/toolbox")
    assert (command["access"], command["action"]) == ("agent_strategy", "invoke_agent_strategy")
    assert command["payload"] == {
        "agent_strategy_provider": "echo_agent",
        "agent_strategy": "echo",
        "agent_strategy_params": {"query": "x"},
    }
    assert command["user_id"] == "user-1"
    assert (command["conversation_id"], command["app_id"]) == ("conv-9", "app-9")
    assert (command["message_id"], command["endpoint_id"]) == ("msg-9", "ep-9")
    assert command["context"] == {"trace": "t-9"}
    events: Any = await env.redis.xrange(env.keys.events)
    mine = [decode_event(f[EVENT_FIELD.encode()]) for _id, f in events]
    [terminal] = [e for e in mine if e.request_id == rid and isinstance(e, TaskSucceeded)]
    assert len(terminal.result.chunks) == 2


async def _events_of(env: DifyEnv, request_id: str) -> list[Any]:
    entries: Any = await env.redis.xrange(env.keys.events)
    events = [decode_event(fields[EVENT_FIELD.encode()]) for _id, fields in entries]
    return [
        SimpleNamespace(type=e.__struct_config__.tag, action=getattr(e, "action", None), event=e)
        for e in events
        if e.request_id == request_id
    ]


def test_every_upstream_route_is_in_the_table() -> None:
    paths = {route.path for route in ROUTES}
    upstream = {
        "tool/invoke",
        "tool/validate_credentials",
        "tool/get_runtime_parameters",
        "llm/invoke",
        "llm/num_tokens",
        "text_embedding/invoke",
        "text_embedding/num_tokens",
        "multimodal_embedding/invoke",
        "rerank/invoke",
        "multimodal_rerank/invoke",
        "tts/invoke",
        "tts/model/voices",
        "speech2text/invoke",
        "moderation/invoke",
        "model/validate_provider_credentials",
        "model/validate_model_credentials",
        "model/schema",
        "agent_strategy/invoke",
        "oauth/get_authorization_url",
        "oauth/get_credentials",
        "oauth/refresh_credentials",
        "datasource/validate_credentials",
        "datasource/get_website_crawl",
        "datasource/get_online_document_pages",
        "datasource/get_online_document_page_content",
        "datasource/online_drive_browse_files",
        "datasource/online_drive_download_file",
        "dynamic_select/fetch_parameter_options",
        "trigger/invoke_event",
        "trigger/validate_credentials",
        "trigger/dispatch_event",
        "trigger/subscribe",
        "trigger/unsubscribe",
        "trigger/refresh",
    }
    assert paths == upstream
    assert len(paths) == len(ROUTES)
