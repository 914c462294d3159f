"""The write gateway (:5003): HTTP in front of the command streams, for producers without Redis.

It only appends commands and reads events; it never runs a handler, so it scales and fails
independently of the workers. Every request needs ``X-Api-Key``.

A request that cannot be carried out raises a :class:`~plugind.errors.PlugindError`; the app's
exception handlers answer ``{"error": {"code", "message"}}`` with the status of the error's
family (:data:`ERROR_STATUS`), so the routes raise what went wrong and never pick a status.

During an outage a request that needs the missing dependency gets a 503 naming it
(``redis_unavailable``: nothing can be published; ``database_unavailable``: uploads and installs
by identifier), not a 500 with a traceback in the log; an open event stream waits for Redis.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import anyio
import asyncpg
import msgspec
import orjson
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from plugind.bus.follow import START, FollowedEvent
from plugind.bus.keys import Keys
from plugind.bus.output import Chunk, Output, OutputFollower
from plugind.client import Client
from plugind.config import Settings
from plugind.errors import ErrorCode, PackageNotFound, PlugindError, TooLarge, WaitTimeout
from plugind.messages import (
    TERMINAL_EVENT_TYPES,
    InstallCommand,
    PackageRef,
    TaskCommand,
    UninstallCommand,
    decode_command,
    encode,
    event_type,
)
from plugind.outage import (
    Backoff,
    Outages,
    describe,
    is_postgres_outage,
    is_redis_outage,
)
from plugind.package.difypkg import read_package
from plugind.projections.package_store import get_package_by_identifier, store_package
from plugind.projections.queries import get_checkpoint, query_events

log = logging.getLogger(__name__)

MAX_JSON_BODY = 8 * 1024 * 1024
MAX_WAIT_S = 300.0
KEEPALIVE_S = 5  # proxies drop an SSE connection that stays silent much longer
MAX_IDLE_S = 3600.0  # a request silent this long has most likely been lost: stop holding a socket


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _error(status: int, code: ErrorCode, message: str) -> Response:
    return _json({"error": {"code": code, "message": message}}, status)


class _ApiKey(BaseHTTPMiddleware):
    def __init__(self, app: Any, api_key: str) -> None:
        super().__init__(app)
        self._key = api_key.encode()

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        given = request.headers.get("x-api-key", "").encode()
        if not hmac.compare_digest(given, self._key):
            return _error(401, "unauthorized", "missing or wrong X-Api-Key")
        return await call_next(request)


class _Gateway:
    def __init__(
        self,
        redis: aioredis.Redis,
        pool: asyncpg.Pool,
        keys: Keys,
        settings: Settings,
        outages: Outages,
    ) -> None:
        self.client = Client(redis, keys)
        self.pool = pool
        self.settings = settings
        self.outages = outages

    async def _body(self, request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise TooLarge("payload_too_large", f"body is over the {limit}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge("payload_too_large", f"body is over the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _json_body(self, request: Request) -> dict[str, Any]:
        raw = await self._body(request, MAX_JSON_BODY)
        try:
            body = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError as exc:
            raise PlugindError("malformed_command", f"body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise PlugindError("malformed_command", "body must be a JSON object")
        return body

    async def upload_package(self, request: Request) -> Response:
        limit = self.settings.max_package_size
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form(max_part_size=limit) as form:
                upload = next((v for v in form.values() if not isinstance(v, str)), None)
                if upload is None:
                    raise PlugindError("invalid_package", "multipart body has no file part")
                data = await upload.read(limit + 1)
                if len(data) > limit:
                    raise TooLarge("package_too_large", f"package is over {limit} bytes")
        else:
            data = await self._body(request, limit)
        package = await anyio.to_thread.run_sync(lambda: read_package(data, max_size=limit))
        await store_package(self.pool, package)
        return _json(
            {
                "sha256": package.sha256,
                "identifier": package.identifier,
                "manifest": msgspec.to_builtins(package.summary()),
            },
            201,
        )

    async def install(self, request: Request) -> Response:
        body = await self._json_body(request)
        sha256 = body.get("sha256")
        identifier = body.get("identifier")
        if not isinstance(sha256, str):
            if not isinstance(identifier, str):
                raise PlugindError("malformed_command", "give `sha256` or `identifier`")
            stored = await get_package_by_identifier(self.pool, identifier)
            if stored is None:
                raise PackageNotFound(f"no package {identifier} in the store")
            sha256 = stored.sha256
        command = InstallCommand(
            request_id=_request_id(body),
            tenant_id=str(body.get("tenant_id") or "default"),
            package=PackageRef(sha256=sha256),
            expected_identifier=identifier if isinstance(identifier, str) else None,
        )
        return _json({"request_id": await self.client.send(command)}, 202)

    async def uninstall(self, request: Request) -> Response:
        plugin_id = f"{request.path_params['author']}/{request.path_params['name']}"
        command = UninstallCommand(
            request_id=request.query_params.get("request_id") or str(uuid.uuid4()),
            tenant_id=request.query_params.get("tenant_id") or "default",
            plugin_id=plugin_id,
        )
        return _json({"request_id": await self.client.send(command)}, 202)

    async def task(self, request: Request) -> Response:
        body = await self._json_body(request)
        body["type"] = "task"
        body.setdefault("request_id", str(uuid.uuid4()))
        try:
            command = decode_command(orjson.dumps(body))
        except msgspec.ValidationError as exc:
            raise PlugindError("malformed_command", str(exc)) from exc
        assert isinstance(command, TaskCommand)
        wait = _wait_seconds(request)
        rid = await self.client.send(command)
        if wait is None:
            return _json({"request_id": rid}, 202)
        try:
            event = await self.client.wait(rid, timeout=wait)
        except WaitTimeout:
            return _json({"request_id": rid, "status": "pending"}, 202)
        return Response(encode(event), media_type="application/json")

    async def task_events(self, request: Request) -> Response:
        rid = request.path_params["request_id"]
        return StreamingResponse(
            self._sse(rid), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def _sse(self, request_id: str) -> AsyncIterator[bytes]:
        """The request's events so far, then new ones, until its terminal event.

        What the projector has committed comes from Postgres; the rest from the events stream,
        read from the projector's checkpoint on (never trimmed past it), so the stream is not
        scanned from its start.
        """
        cursor = START
        try:
            async with self.pool.acquire() as conn:
                checkpoint = await get_checkpoint(conn)
                page = await query_events(conn, request_id=request_id, limit=1000)
        except Exception as exc:
            if not (is_postgres_outage(exc) or isinstance(exc, asyncpg.PostgresError)):
                raise
            if is_postgres_outage(exc):
                self.outages.postgres.failed(exc)
            checkpoint, page = None, None  # read it all from the stream instead
        if checkpoint is not None and page is not None and checkpoint.last_stream_id:
            cursor = checkpoint.last_stream_id
            for row in page.events:
                if row.position > checkpoint.last_position:
                    continue  # committed after we read the checkpoint: the stream has it
                yield _frame(row.stream_id, row.type, orjson.dumps(row.event))
                if row.type in TERMINAL_EVENT_TYPES:
                    return
        # A task sent with "stream": true also has live output: its chunks are relayed as
        # `chunk` events between its own events, in the order Redis wrote them.
        output = OutputFollower(
            self.client.redis,
            self.client.keys,
            request_id,
            events_after=cursor,
            block_ms=KEEPALIVE_S * 1000,
            count=1000,
        )
        idle_since = anyio.current_time()
        backoff = Backoff(0.1, 1.0)
        while not output.ended:
            try:
                batch = await anext(output)
            except StopAsyncIteration:
                return
            except Exception as exc:
                if not is_redis_outage(exc):
                    raise
                self.outages.redis.failed(exc)  # keep the stream open: Redis may be back soon
                yield b": waiting for Redis\n\n"
                await backoff.sleep()
                continue
            backoff.reset()
            if batch is None:
                yield b": keep-alive\n\n"
                if anyio.current_time() - idle_since > MAX_IDLE_S:
                    return
                continue
            idle_since = anyio.current_time()
            for item in batch:
                yield _output_frame(item)


def _output_frame(item: Output) -> bytes:
    if isinstance(item, Chunk):
        return _frame(item.entry_id, "chunk", item.data)
    if isinstance(item, FollowedEvent):
        return _frame(item.entry_id, event_type(item.event), item.raw)
    event = item.event()  # the terminal event, as read (and decoded) from the events stream
    assert event is not None and item.raw is not None
    return _frame(item.entry_id, event_type(event), item.raw)


def _frame(entry_id: str, kind: str, data: bytes) -> bytes:
    return f"id: {entry_id}\nevent: {kind}\ndata: ".encode() + data + b"\n\n"


def _request_id(body: dict[str, Any]) -> str:
    rid = body.get("request_id")
    return rid if isinstance(rid, str) and rid else str(uuid.uuid4())


def _wait_seconds(request: Request) -> float | None:
    raw = request.query_params.get("wait")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise PlugindError("malformed_command", f"wait={raw!r} is not a number") from None
    return min(max(value, 0.0), MAX_WAIT_S)


ERROR_STATUS: Final[dict[type[PlugindError], int]] = {
    PlugindError: 400,
    TooLarge: 413,
    PackageNotFound: 404,
}
"""The HTTP status of each error family. Starlette picks the handler of the closest class in
an exception's MRO, so a subclass listed here wins over :class:`PlugindError`."""


Endpoint = Callable[[Request], Awaitable[Response]]


def _outage_guard(handler: Endpoint, outages: Outages) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        try:
            response: Response = await handler(request)
            return response
        except Exception as exc:
            # the tracker logs the outage once; no traceback per request
            if is_redis_outage(exc):
                outages.redis.failed(exc)
                return _error(
                    503,
                    "redis_unavailable",
                    f"Redis is unreachable ({describe(exc)}); nothing was published, "
                    "try again once it is back",
                )
            if is_postgres_outage(exc):
                outages.postgres.failed(exc)
                return _error(
                    503,
                    "database_unavailable",
                    f"this request needs Postgres, which is unreachable ({describe(exc)}); "
                    "try again once it is back",
                )
            raise

    return endpoint


def _answer_with(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handler(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PlugindError)
        return _error(status, exc.code, exc.message)

    return handler


def create_gateway_app(
    *,
    redis: aioredis.Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    settings: Settings,
    outages: Outages | None = None,
) -> Starlette:
    if not settings.api_key:
        raise PlugindError("unauthorized", "the gateway refuses to start without PLUGIND_API_KEY")
    outages = outages or Outages()
    gw = _Gateway(redis, pool, keys, settings, outages)
    guarded = [
        ("/api/v1/packages", gw.upload_package, "POST"),
        ("/api/v1/plugins/install", gw.install, "POST"),
        ("/api/v1/plugins/{author}/{name}", gw.uninstall, "DELETE"),
        ("/api/v1/tasks", gw.task, "POST"),
    ]
    routes = [
        *(Route(path, _outage_guard(h, outages), methods=[m]) for path, h, m in guarded),
        Route("/api/v1/tasks/{request_id}/events", gw.task_events, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_ApiKey, api_key=settings.api_key)],
        exception_handlers={cls: _answer_with(status) for cls, status in ERROR_STATUS.items()},
    )
