"""The read API (:5002): health, stats, plugins, tasks, events, metrics (docs/operations.md).

Everything here reads; the projector is the only writer of what it serves. Errors are JSON
``{"error": {"code", "message"}}``: 400 for a bad query parameter (the message says which and
what is accepted), 404 for an unknown task or route, 503 when Postgres cannot be reached.

The routes that return tenants' data need ``X-Api-Key`` (:mod:`plugind.http.auth`); health,
metrics and the aggregate stats are open. The daemon mounts the Dify daemon API on the same
app through ``extra_routes``, behind the same key.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import orjson
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from plugind.bus.keys import Keys
from plugind.errors import BadParameterError, ErrorCode
from plugind.http.auth import ApiKeyGuard
from plugind.http.health import check_health
from plugind.http.metrics import render_metrics
from plugind.metrics import NodeMetrics
from plugind.outage import Outages, describe, is_postgres_outage
from plugind.projections.queries import (
    MAX_EVENTS_LIMIT,
    get_task,
    list_plugins,
    query_events,
)
from plugind.projections.stats import task_stats
from plugind.runtime.pool import PluginPool

log = logging.getLogger(__name__)

ACQUIRE_TIMEOUT_S: Final = 5.0
MAX_WINDOW: Final = timedelta(days=3650)
_WINDOW_RE: Final = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def error_response(status: int, code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def parse_window(raw: str) -> timedelta:
    """``15m``, ``1h``, ``7d``, ``2w``, ``30s`` or plain seconds (``900``)."""
    match = _WINDOW_RE.match(raw.strip().lower())
    if not match:
        raise BadParameterError(
            f"window must be a number of seconds or a number followed by s, m, h, d or w "
            f"(e.g. 15m, 1h, 7d), got {raw!r}"
        )
    window = timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    if not timedelta(0) < window <= MAX_WINDOW:
        raise BadParameterError(f"window must be positive and at most 3650d, got {raw!r}")
    return window


def parse_since(raw: str, name: str = "since") -> datetime | int:
    """An event-log position (an integer) or an RFC 3339 time (UTC if no offset is given)."""
    if raw.isdigit():
        return int(raw)
    try:
        value = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise BadParameterError(
            f"{name} must be a log position or an RFC 3339 time "
            f"(e.g. 2024-05-01T12:00:00Z), got {raw!r}"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_int(
    raw: str | None, name: str, *, default: int | None, low: int, high: int
) -> int | None:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadParameterError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadParameterError(f"{name} must be between {low} and {high}, got {value}")
    return value


def parse_plugin(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    short = raw.split(":", 1)[0]
    if short.count("/") != 1 or not all(short.split("/")) or len(raw) > 512:
        raise BadParameterError(f"plugin must be author/name, got {raw!r}")
    return short


def create_read_app(
    *,
    redis: Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    version: str,
    lag_threshold: int = 10_000,
    outages: Outages | None = None,
    plugin_pool: PluginPool | None = None,
    api_key: str | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    metrics: NodeMetrics | None = None,
    node: str | None = None,
) -> Starlette:
    """The read API app; it owns nothing, so closing ``redis`` and ``pool`` is the caller's job.

    ``outages`` (the daemon's trackers) feeds ``/health``'s probes into the outage log.
    ``metrics`` is this node's registry, which ``/metrics`` serves with every other node's, the
    whole labelled by ``node``. ``plugin_pool`` is the plugin pool of this process, for
    ``/health``; ``None`` where the process runs no worker. ``api_key`` guards the tenants'
    data (without one those routes answer 401); ``extra_routes`` are mounted after the read
    routes, behind the same guard.
    """

    async def health(request: Request) -> Response:
        report = await check_health(
            redis=redis,
            pool=pool,
            keys=keys,
            version=version,
            lag_threshold=lag_threshold,
            outages=outages,
            plugins=plugin_pool,
        )
        return JSONResponse(report.to_dict(), status_code=report.http_status)

    async def liveness(request: Request) -> Response:
        # upstream's liveness path: the process answers, whatever its dependencies say
        return JSONResponse({"status": "ok", "version": version})

    async def prometheus(request: Request) -> Response:
        body = await render_metrics(redis, pool, keys, metrics, node)
        return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)

    async def database_unavailable(request: Request, exc: Exception) -> Response:
        if is_postgres_outage(exc):
            if outages is not None:
                outages.postgres.failed(exc)  # logged once per outage, not once per request
            message = f"Postgres is unreachable ({describe(exc)}); try again once it is back"
        else:
            log.error("Read API %s %s failed: %r", request.method, request.url.path, exc)
            message = f"the database did not answer: {exc!r}"
        return error_response(503, "database_unavailable", message)

    async def stats(request: Request) -> Response:
        q = request.query_params
        window = parse_window(q["window"]) if q.get("window") else None
        plugin = parse_plugin(q.get("plugin"))
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            result = await task_stats(conn, window=window, plugin_id=plugin)
        return JSONResponse(result.to_dict())

    async def plugins(request: Request) -> Response:
        q = request.query_params
        status = q.get("status") or "installed"
        if status not in ("installed", "uninstalled", "all"):
            raise BadParameterError(f"status must be installed, uninstalled or all, got {status!r}")
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            rows = await list_plugins(
                conn,
                tenant_id=q.get("tenant_id") or None,
                status=None if status == "all" else status,
            )
        return JSONResponse({"plugins": [row.to_dict() for row in rows]})

    async def task(request: Request) -> Response:
        request_id = request.path_params["request_id"]
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            row = await get_task(conn, request_id)
        if row is None:
            return error_response(404, "not_found", f"no task with request_id {request_id!r}")
        return JSONResponse(row.to_dict())

    async def events(request: Request) -> Response:
        q = request.query_params
        types = [t for t in (q.get("type") or "").split(",") if t.strip()]
        limit = parse_int(q.get("limit"), "limit", default=100, low=1, high=MAX_EVENTS_LIMIT)
        after = parse_int(q.get("after"), "after", default=None, low=0, high=2**63 - 1)
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            page = await query_events(
                conn,
                types=[t.strip() for t in types] or None,
                plugin_id=parse_plugin(q.get("plugin")),
                request_id=q.get("request") or None,
                tenant_id=q.get("tenant") or None,
                since=parse_since(q["since"]) if q.get("since") else None,
                until=parse_since(q["until"], "until") if q.get("until") else None,
                after=after,
                limit=limit or 100,
            )
        return JSONResponse(page.to_dict())

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/health/check", liveness),
            Route("/metrics", prometheus),
            Route("/api/v1/plugins/stats", stats),
            Route("/api/v1/plugins", plugins),
            Route("/api/v1/tasks/{request_id:str}", task),
            Route("/api/v1/events", events),
            *extra_routes,
        ],
        middleware=[Middleware(ApiKeyGuard, api_key=api_key)],
        exception_handlers={
            BadParameterError: _bad_parameter,
            HTTPException: _http_error,
            asyncpg.PostgresError: database_unavailable,
            asyncpg.InterfaceError: database_unavailable,
            OSError: database_unavailable,
            TimeoutError: database_unavailable,
        },
    )


async def _bad_parameter(request: Request, exc: Exception) -> Response:
    return error_response(400, "invalid_parameter", str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes: dict[int, ErrorCode] = {404: "not_found", 405: "method_not_allowed"}
    code: ErrorCode = codes.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))
