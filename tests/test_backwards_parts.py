"""The parts of plugind.backwards and the endpoint helpers, without a daemon or a plugin.

Dify's frames, permissions, audit targets, storage keys and quota (on a real Postgres), the
inner-API client against scripted answers (``httpx.MockTransport``) and a closed port, the
relay's refusals, endpoint settings checks and masking, and the raw request a hook hands to
the plugin.
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import asyncpg
import httpx
import orjson
import pytest
from fake_dify import fake_dify
from starlette.requests import Request

from plugind.backwards import (
    FrameError,
    InnerApi,
    InnerApiError,
    Permission,
    Permissions,
    PluginStorage,
    Relay,
    StorageError,
    target_of,
)
from plugind.backwards.frames import FrameDecoder, encode_frame
from plugind.backwards.kinds import KINDS
from plugind.backwards.storage import check_key
from plugind.dify import settings_schema
from plugind.dify.hooks import raw_request
from plugind.runtime.backwards import STRUCT, BackwardsCall, Caller

pytestmark = pytest.mark.anyio


def item(data: Any = None, error: str = "") -> bytes:
    return orjson.dumps({"data": data, "error": error})


# --------------------------------------------------------------------------------------------
# frames


def test_frames_split_however_the_bytes_arrive() -> None:
    stream = encode_frame(item({"n": 1})) + encode_frame(item({"n": 2})) + encode_frame(b"")
    decoder = FrameDecoder(1024)
    out: list[bytes] = []
    for i in range(len(stream)):
        out.extend(decoder.feed(stream[i : i + 1]))
    assert [orjson.loads(p)["data"] for p in out[:2]] == [{"n": 1}, {"n": 2}]
    assert out[2] == b"" and decoder.pending == 0
    whole = FrameDecoder(1024)
    assert len(whole.feed(stream)) == 3
    cut = FrameDecoder(1024)
    two = encode_frame(item({"n": 1})) + encode_frame(item({"n": 2}))
    assert cut.feed(two + encode_frame(b"x")[:5]) == out[:2]
    assert cut.pending == 5


def test_frames_that_are_not_difys() -> None:
    with pytest.raises(FrameError, match="magic"):
        FrameDecoder(1024).feed(b'{"data": 1}')
    with pytest.raises(FrameError, match="over the 8-byte limit"):
        FrameDecoder(8).feed(encode_frame(b"123456789"))


# --------------------------------------------------------------------------------------------
# permissions and targets


def test_permissions_from_the_manifest() -> None:
    def of(permission: Any) -> Permission:
        return Permission.from_declaration({"resource": {"memory": 1, "permission": permission}})

    none = Permission.from_declaration({"resource": {"memory": 1}})
    assert [k for k in KINDS if none.denial(KINDS[k]) is None] == ["upload_file"]
    model = of({"model": {"enabled": True, "llm": True}})
    assert model.denial(KINDS["llm"]) is None
    assert model.denial(KINDS["system_summary"]) is None
    assert model.denial(KINDS["text_embedding"]) == (
        "permission denied, you need to enable text-embedding access in plugin manifest"
    )
    flag_only = of({"model": {"enabled": False, "llm": True}})
    assert flag_only.denial(KINDS["llm"]) is not None  # the model switch comes first
    assert of({"storage": {"enabled": True}}).storage_size == 1024 * 1024
    sized = of({"storage": {"enabled": True, "size": 4096}, "app": {"enabled": True}})
    assert sized.storage_size == 4096
    assert sized.denial(KINDS["fetch_app"]) is None and sized.denial(KINDS["storage"]) is None
    assert of({"tool": {"enabled": "yes"}}).denial(KINDS["tool"]) is not None


def test_targets_name_the_thing_never_the_contents() -> None:
    llm = {"provider": "openai", "model": "gpt-4o", "prompt_messages": [{"content": "secret"}]}
    assert target_of("llm", llm) == "openai/gpt-4o"
    tool = {"provider": "time", "tool": "now", "tool_parameters": {"x": "secret"}}
    assert target_of("tool", tool) == "time/now"
    node = {"model": {"provider": "p", "name": "m"}, "query": "secret"}
    assert target_of("node_question_classifier", node) == "p/m"
    assert target_of("storage", {"opt": "set", "key": "k", "value": "73"}) == "set"
    assert target_of("app", {"app_id": "a1", "inputs": {"q": "secret"}}) == "a1"
    assert target_of("system_summary", {"text": "secret"}) == ""
    assert target_of("llm", {"provider": 3}) == ""


def test_storage_keys_follow_upstreams_rules() -> None:
    assert check_key("a/b.c") == "a/b.c"
    assert check_key("é" * 128) == "é" * 128  # 256 bytes
    for bad in ("", "é" * 129, "../x", "a\\b", 7):
        with pytest.raises(StorageError):
            check_key(bad)


# --------------------------------------------------------------------------------------------
# storage on Postgres


async def test_storage_quota_holds_under_concurrent_writes(pool: asyncpg.Pool) -> None:
    storage = PluginStorage(pool)
    await storage.set("t1", "acme/p", "a", b"x" * 400, 1000)
    await storage.set("t1", "acme/p", "a", b"x" * 100, 1000)  # a smaller value frees space
    assert await storage.usage("t1", "acme/p") == 100
    results: list[bool] = []

    async def put(key: str) -> None:
        try:
            await storage.set("t1", "acme/p", key, b"y" * 300, 1000)
            results.append(True)
        except StorageError:
            results.append(False)

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(put, f"k{i}")
    assert results.count(True) == 3
    assert await storage.usage("t1", "acme/p") == 1000
    assert await storage.delete("t1", "acme/p", "a") == 1
    assert await storage.delete("t1", "acme/p", "a") == 0
    assert await storage.usage("t1", "acme/p") == 900
    assert not await storage.exists("t2", "acme/p", "k0")  # per tenant
    with pytest.raises(StorageError, match="not set it"):
        await storage.get("t1", "acme/other", "k0")  # per plugin


# --------------------------------------------------------------------------------------------
# the inner API client


def scripted(answer: httpx.Response | Exception) -> tuple[InnerApi, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return InnerApi("http://dify", "key-1", transport=httpx.MockTransport(handle)), seen


async def collect(inner: InnerApi, path: str = "invoke/llm") -> list[Any]:
    items: list[Any] = []

    async def keep(data: Any) -> None:
        items.append(data)

    try:
        await inner.exchange(path, {"tenant_id": "t"}, keep)
    finally:
        await inner.aclose()
    return items


async def test_the_client_reads_frames_and_documents() -> None:
    frames = encode_frame(item({"n": 1})) + encode_frame(item({"n": 2}))
    inner, seen = scripted(httpx.Response(200, content=frames))
    assert await collect(inner) == [{"n": 1}, {"n": 2}]
    [request] = seen
    assert str(request.url) == "http://dify/inner/api/invoke/llm"
    assert request.headers["x-inner-api-key"] == "key-1"
    assert orjson.loads(request.content) == {"tenant_id": "t"}
    inner, _ = scripted(httpx.Response(200, content=item({"embeddings": []})))
    assert await collect(inner, "invoke/text-embedding") == [{"embeddings": []}]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            httpx.Response(404, content=b"nope"),
            "HTTP 404 to invoke/llm (a wrong DIFY_INNER_API_KEY",
        ),
        (httpx.Response(500, content=b"tenant_id is required"), "HTTP 500"),
        (httpx.Response(200, content=encode_frame(item(error="quota"))), "quota"),
        (httpx.Response(200, content=encode_frame(item()) + b""), "has no data"),
        (httpx.Response(200, content=encode_frame(item({"n": 1}))[:-2]), "cut off"),
        (httpx.Response(200, content=b"<html>"), "not JSON"),
        (httpx.ReadTimeout("slow"), "did not answer in time"),
        (httpx.ConnectError("refused"), "unreachable"),
    ],
)
async def test_what_the_client_turns_into_errors(
    answer: httpx.Response | Exception, message: str
) -> None:
    inner, _ = scripted(answer)
    with pytest.raises(InnerApiError, match=message.replace("(", r"\(")):
        await collect(inner)


async def test_many_calls_share_a_small_pool() -> None:
    async with fake_dify(frame_delay=0.05) as fake:
        inner = InnerApi(fake.url, fake.key, pool_size=2)
        words: list[list[Any]] = []

        async def ask() -> None:
            got: list[Any] = []

            async def keep(data: Any) -> None:
                got.append(data["delta"]["message"]["content"])

            await inner.exchange("invoke/llm", {"tenant_id": "t", "model": "m"}, keep)
            words.append(got)

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(ask)
        finally:
            await inner.aclose()
    assert words == [fake.llm_words] * 8
    assert len(fake.received) == 8


async def test_a_closed_port_fails_at_once() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inner = InnerApi(f"http://127.0.0.1:{port}", "k", connect_timeout=1)
    with anyio.fail_after(5), pytest.raises(InnerApiError, match="unreachable"):
        await collect(inner)


# --------------------------------------------------------------------------------------------
# the relay's refusals


class _Reply:
    def __init__(self) -> None:
        self.answers: list[tuple[str, Any]] = []

    async def respond(self, data: Any, *, message: str = STRUCT) -> None:
        self.answers.append((message, data))

    async def fail(self, message: str) -> None:
        self.answers.append(("error", message))

    async def end(self) -> None:
        self.answers.append(("end", None))


class _Declarations:
    """A stand-in for the pool: what ``Permissions`` reads from the package store."""

    def __init__(self, declaration: Any) -> None:
        self.declaration = declaration

    async def fetchval(self, query: str, *args: Any) -> Any:
        return orjson.dumps(self.declaration).decode()


def relay(permission: dict[str, Any]) -> Relay:
    db: Any = _Declarations({"resource": {"memory": 1, "permission": permission}})
    return Relay(
        permissions=Permissions(db),
        storage=PluginStorage(db),
        inner_api=None,
        storage_max_size=1 << 20,
    )


def caller(access: str = "tool") -> Caller:
    return Caller("r1", "t1", "u1", "acme/p", "acme/p:0.1.0@x", access, "invoke_tool")


async def test_the_relay_refuses_before_anything_leaves() -> None:
    everything = relay({"model": {"enabled": True, "llm": True}, "storage": {"enabled": True}})
    cases = [
        (everything, caller(), BackwardsCall("telepathy", "b", {}), "denied", "unsupported"),
        (everything, caller("model"), BackwardsCall("llm", "b", {}), "denied", "from model"),
        (relay({}), caller(), BackwardsCall("llm", "b", {}), "denied", "enable llm access"),
        (everything, caller(), BackwardsCall("llm", "b", {}), "error", "DIFY_INNER_API_URL"),
        (
            everything,
            caller(),
            BackwardsCall("storage", "b", {"opt": "set", "key": "k", "value": "zz"}),
            "error",
            "decode data failed",
        ),
        (
            everything,
            caller(),
            BackwardsCall("storage", "b", {"opt": "move", "key": "k"}),
            "error",
            "unknown storage operation",
        ),
    ]
    for serving, who, call, outcome, message in cases:
        reply = _Reply()
        result = await serving(who, call, reply)
        assert (result.kind, result.outcome) == (call.kind, outcome)
        assert message in (result.error or "")
        [(event, text)] = reply.answers
        assert event == "error" and message in text


# --------------------------------------------------------------------------------------------
# endpoint settings and the raw request


SCHEMA: list[dict[str, Any]] = [
    {"name": "key", "type": "secret-input", "required": True},
    {"name": "mode", "type": "select", "options": [{"value": "a"}, {"value": "b"}]},
    {"name": "on", "type": "boolean"},
    {"name": "app", "type": "app-selector"},
]


def test_settings_are_checked_and_secrets_masked() -> None:
    settings_schema.validate({"key": "k", "mode": "a", "on": True, "app": {"app_id": "x"}}, SCHEMA)
    for bad, message in (
        ({}, "missing required setting: key"),
        ({"key": 1}, "key is not a string"),
        ({"key": "k", "mode": "c"}, "mode is not a valid option"),
        ({"key": "k", "on": "yes"}, "on is not a boolean"),
        ({"key": "k", "app": {}}, "app is missing app_id"),
        ({"key": "k", **{f"x{i}": 1 for i in range(64)}}, "too many"),
    ):
        with pytest.raises(settings_schema.SettingsError, match=message):
            settings_schema.validate(bad, SCHEMA)
    secrets = settings_schema.secret_names(SCHEMA)
    assert settings_schema.masked({"key": "sk-1234567", "mode": "a"}, secrets) == {
        "key": "sk******67",
        "mode": "a",
    }
    assert settings_schema.masked({"key": "short"}, secrets) == {"key": "*****"}


def test_the_raw_request_the_plugin_gets() -> None:
    scope = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "path": "/e/h1/a b/c",
        "raw_path": b"/e/h1/a%20b/c",
        "query_string": b"x=1&y=%2F",
        "headers": [
            (b"host", b"dify.example"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"x-forwarded-proto", b"https"),
            (b"x-real-ip", b"10.0.0.2"),
            (b"x-original-url", b"/secret"),
            (b"dify-hook-id", b"spoofed"),
            (b"x_under", b"refused by the SDK"),
            (b"content-type", b"text/plain"),
            (b"content-length", b"999"),
            (b"x-keep", b"yes"),
        ],
    }
    raw = raw_request(Request(scope), "h1", b"body")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /a%20b/c?x=1&y=%2F HTTP/1.1"
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    assert headers == [
        (b"Host", b"dify.example"),
        (b"content-type", b"text/plain"),
        (b"x-keep", b"yes"),
        (b"Dify-Hook-Url", b"https://dify.example/e/h1/a%20b/c"),
        (b"Dify-Hook-Id", b"h1"),
        (b"Content-Length", b"4"),
    ]
    assert body == b"body"
    bare = raw_request(
        Request({**scope, "raw_path": b"/e/h1", "query_string": b"", "headers": []}), "h1", b""
    )
    assert bare.startswith(b"POST / HTTP/1.1\r\nHost: localhost\r\n")
