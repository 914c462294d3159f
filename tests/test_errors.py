"""Error codes keep their wire strings, subclasses carry their codes, the gateway maps families."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, get_args

import asyncpg
import httpx
import msgspec
import orjson
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugind.bus.keys import Keys
from plugind.config import Settings
from plugind.errors import (
    ERROR_CODES,
    PackageNotFound,
    PlainCode,
    PlugindError,
    TimedOut,
    TooLarge,
    TooLargeCode,
)
from plugind.http.gateway import ERROR_STATUS, create_gateway_app
from plugind.messages import (
    CommandRejected,
    ErrorInfo,
    EventFactory,
    TaskFailed,
    decode_event,
    encode,
)
from plugind.projections.migrate import migrate

# The wire strings, written out: renaming a code in errors.py must fail here, since producers
# (and events already in the log) hold the old string.
EVENT_CODES = {
    "malformed_command",
    "unknown_plugin",
    "not_installed",
    "package_too_large",
    "invalid_package",
    "unsafe_package",
    "checksum_mismatch",
    "signature_invalid",
    "dependency_install_failed",
    "plugin_start_failed",
    "plugin_crashed",
    "plugin_error",
    "timeout",
    "result_too_large",
    "package_not_found",
    "payload_too_large",
    "max_deliveries_exceeded",
    "database_unavailable",
}
HTTP_ONLY_CODES = {
    "unauthorized",
    "invalid_parameter",
    "not_found",
    "method_not_allowed",
    "http_error",
    "redis_unavailable",
}

ev = EventFactory("test-node")


def test_the_codes_are_exactly_the_wire_strings() -> None:
    assert len(ERROR_CODES) == len(set(ERROR_CODES))
    assert set(ERROR_CODES) == EVENT_CODES | HTTP_ONLY_CODES
    assert all(type(code) is str for code in ERROR_CODES)


@pytest.mark.parametrize("code", sorted(EVENT_CODES))
def test_every_code_round_trips_through_an_event(code: str) -> None:
    event = ev(
        TaskFailed,
        request_id="r1",
        tenant_id="t1",
        plugin_id="a/b",
        error=ErrorInfo(code, "boom"),
        duration_ms=1.0,
    )
    raw = encode(event)
    assert f'"error":{{"code":"{code}","message":"boom"}}'.encode() in raw
    decoded = decode_event(raw)
    assert isinstance(decoded, TaskFailed)
    assert decoded.error.code == code
    assert decoded.error == event.error


def test_every_event_code_is_raised_plainly_or_by_exactly_one_family() -> None:
    plain = set(get_args(PlainCode))
    too_large = set(get_args(TooLargeCode))
    owned = {"timeout", "package_not_found"} | too_large
    assert not plain & owned
    assert plain | owned >= EVENT_CODES
    assert plain | owned <= set(ERROR_CODES)


@pytest.mark.parametrize(
    ("error", "cls", "code"),
    [
        (TimedOut("slow"), TimedOut, "timeout"),
        (TooLarge("payload_too_large", "big"), TooLarge, "payload_too_large"),
        (TooLarge("package_too_large", "big"), TooLarge, "package_too_large"),
        (PackageNotFound("gone"), PackageNotFound, "package_not_found"),
        (PlugindError("plugin_crashed", "died"), PlugindError, "plugin_crashed"),
    ],
)
def test_each_class_carries_its_code(
    error: PlugindError, cls: type[PlugindError], code: str
) -> None:
    assert type(error) is cls and isinstance(error, PlugindError)
    assert error.code == code
    assert error.info() == ErrorInfo(code, error.message)
    assert str(error) == error.message
    assert repr(error) == f"{cls.__name__}({code!r}, {error.message!r})"


def test_a_plugin_error_keeps_its_type_and_args_on_the_wire() -> None:
    error = PlugindError("plugin_error", "bad", error_type="ValueError", args=["x"])
    event = ev(
        CommandRejected,
        request_id="r1",
        tenant_id="t1",
        stream="s",
        entry_id="1-0",
        error=error.info(),
        raw="",
    )
    assert orjson.loads(encode(event))["error"] == {
        "code": "plugin_error",
        "message": "bad",
        "error_type": "ValueError",
        "args": ["x"],
    }


def test_a_timeout_is_caught_apart_from_other_failures() -> None:
    caught: list[str] = []
    for error in (TimedOut("slow"), PlugindError("plugin_error", "boom")):
        try:
            raise error
        except TimedOut:
            caught.append("timed_out")
        except PlugindError as exc:
            caught.append(exc.code)
    assert caught == ["timed_out", "plugin_error"]


# ------------------------------------------------------------------------------------------------
# the write gateway

LIMIT = 4096


@pytest.fixture
async def gateway_app(
    redis: aioredis.Redis, database_url: str, keys: Keys
) -> AsyncIterator[Starlette]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await migrate(conn)
    settings = Settings(api_key="k", max_package_size=LIMIT)
    yield create_gateway_app(redis=redis, pool=pool, keys=keys, settings=settings)
    await pool.close()


def _client(app: Starlette, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers
    )


def test_the_gateway_statuses_of_the_families() -> None:
    assert {PlugindError: 400, TooLarge: 413, PackageNotFound: 404} == ERROR_STATUS


@pytest.mark.anyio
async def test_each_family_gets_its_status_from_the_gateway_handlers(
    gateway_app: Starlette,
) -> None:
    """The gateway's own handlers on routes that raise one error of each family."""
    errors: dict[str, PlugindError] = {
        "timeout": TimedOut("slow"),
        "payload": TooLarge("payload_too_large", "big body"),
        "package": TooLarge("package_too_large", "big package"),
        "missing": PackageNotFound("no such package"),
        "plain": PlugindError("malformed_command", "bad"),
    }

    def raiser(error: PlugindError) -> Any:
        async def endpoint(request: Request) -> Response:
            raise error

        return endpoint

    app = Starlette(
        routes=[Route(f"/{name}", raiser(error)) for name, error in errors.items()],
        exception_handlers=gateway_app.exception_handlers,
    )
    expected = {"timeout": 400, "payload": 413, "package": 413, "missing": 404, "plain": 400}
    async with _client(app) as http:
        for name, error in errors.items():
            response = await http.get(f"/{name}")
            assert response.status_code == expected[name], name
            assert response.json() == {"error": {"code": error.code, "message": error.message}}


@pytest.mark.anyio
async def test_the_gateway_routes_answer_each_family_as_before(gateway_app: Starlette) -> None:
    async with _client(gateway_app, **{"X-Api-Key": "k"}) as http:
        body = await http.post("/api/v1/packages", content=b"x" * (LIMIT + 1))
        assert (body.status_code, body.json()["error"]["code"]) == (413, "payload_too_large")

        part = await http.post(
            "/api/v1/packages", files={"file": ("p.difypkg", b"x" * (LIMIT + 1), "application/zip")}
        )
        assert (part.status_code, part.json()["error"]["code"]) == (413, "package_too_large")

        missing = await http.post(
            "/api/v1/plugins/install", json={"identifier": "a/b:1.0.0@" + "0" * 64}
        )
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "package_not_found")

        garbage = await http.post("/api/v1/packages", content=b"not a zip")
        assert (garbage.status_code, garbage.json()["error"]["code"]) == (400, "invalid_package")

        not_json = await http.post("/api/v1/tasks", content=b"{nope")
        assert (not_json.status_code, not_json.json()["error"]["code"]) == (
            400,
            "malformed_command",
        )

    async with _client(gateway_app) as anonymous:
        refused = await anonymous.post("/api/v1/tasks", json={})
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "unauthorized")


def test_error_info_decodes_a_code_this_version_does_not_know() -> None:
    """``ErrorInfo.code`` stays ``str`` on the wire, so a newer writer's code still decodes."""
    info = msgspec.json.decode(b'{"code":"some_future_code","message":"m"}', type=ErrorInfo)
    assert info.code == "some_future_code"
