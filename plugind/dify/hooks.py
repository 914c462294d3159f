"""``/e/{hook_id}/{path}``: plugin endpoints answering HTTP (DIFY-DAEMON-API.md §5).

Public, as upstream: the hook id is the secret. A request becomes one streamed task command
(access ``endpoint``, action ``invoke_endpoint``), so it runs, is retried and is recorded like
any other task:

1. the hook's endpoint (``endpoints`` read model) must exist and be enabled, else 404;
2. the raw request is rebuilt as HTTP/1.1 bytes: the path after the hook id, the query, the
   headers without ``X-Forwarded-*``, ``X-Real-IP`` and ``X-Original-*`` (and without names the
   SDK refuses, those with ``_``), plus ``Dify-Hook-Id`` and ``Dify-Hook-Url``, and the body
   (at most ``PLUGIN_ENDPOINT_MAX_REQUEST_SIZE``, else 413);
3. the task's payload is ``{settings, raw_http_request: <hex>}``, the settings with their
   secret inputs decrypted by Dify; it is published only if the tenant still has the plugin
   installed (else 404);
4. the plugin's chunks (``{status, headers}`` then ``{result: <hex body part>}``…) become the
   response as they arrive: one plain response when the whole answer is there at once, a
   streamed one otherwise. The body is cut at ``PLUGIN_ENDPOINT_MAX_RESPONSE_SIZE``.

A plugin that fails before answering gives a 500 with Dify's JSON envelope (upstream: "killed
by timeout" when it ran out of time).
"""

from __future__ import annotations

import binascii
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis.exceptions
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from plugind.bus.codec import CMD_FIELD, command_fields
from plugind.bus.keys import installed_field
from plugind.dify import envelope as env
from plugind.dify import settings_schema
from plugind.dify.deps import DifyDeps
from plugind.dify.dispatch import PUBLISH_IF_INSTALLED, RELAY_GRACE_S
from plugind.dify.endpoint_secrets import EndpointSecrets
from plugind.dify.endpoints import declaration_of
from plugind.dify.stream import terminal_error
from plugind.dify.task_output import Batch, task_output
from plugind.messages import AnyEvent, TaskCommand, TaskSucceeded

log = logging.getLogger(__name__)

METHODS: Final = ["HEAD", "GET", "POST", "PUT", "DELETE", "OPTIONS"]
HOOK_ID_HEADER: Final = b"dify-hook-id"
HOOK_URL_HEADER: Final = b"dify-hook-url"
_DROPPED_PREFIXES: Final = (b"x-forwarded-", b"x-original-")
_DROPPED: Final = frozenset(
    {
        b"x-forwarded",
        b"x-real-ip",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        HOOK_ID_HEADER,
    }
)
# Response headers that describe the framing between the plugin and us, not the body we send.
_HOP_BY_HOP: Final = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


@dataclass(frozen=True, slots=True)
class Hook:
    endpoint_id: str
    tenant_id: str
    plugin_id: str
    enabled: bool
    settings: dict[str, Any]
    secrets: dict[str, Any]


_LOOKUP: Final = """
SELECT e.endpoint_id, e.tenant_id, e.plugin_id, e.enabled, e.settings::text AS settings,
       s.secrets::text AS secrets
FROM endpoints e LEFT JOIN endpoint_secrets s ON s.endpoint_id = e.endpoint_id
WHERE e.hook_id = $1
"""


class Hooks:
    def __init__(self, deps: DifyDeps) -> None:
        self.deps = deps
        self.secrets = EndpointSecrets(deps.pool, deps.inner_api)
        self._publish = deps.redis.register_script(PUBLISH_IF_INSTALLED)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/e/{hook_id}", self.handle, methods=METHODS),
            Route("/e/{hook_id}/{path:path}", self.handle, methods=METHODS),
        ]

    async def handle(self, request: Request) -> Response:
        hook_id: str = request.path_params["hook_id"]
        try:
            hook = await self._hook(hook_id)
            if hook is None or not hook.enabled:
                return _error(404, env.not_found("endpoint not found"))
            limit = self.deps.settings.endpoint_max_request_size
            body = await _body(request, limit)
            if body is None:
                return _error(
                    413, env.bad_request(f"the request body is over the {limit}-byte limit")
                )
            settings = await self._settings(hook)
            command = TaskCommand(
                request_id=f"endpoint:{uuid.uuid4()}",
                tenant_id=hook.tenant_id,
                plugin_id=hook.plugin_id,
                access="endpoint",
                action="invoke_endpoint",
                payload={
                    "settings": settings,
                    "raw_http_request": raw_request(request, hook_id, body).hex(),
                },
                endpoint_id=hook.endpoint_id,
                stream=True,
            )
            if not await self._publish_if_installed(command):
                return _error(404, env.plugin_not_found("plugin not found"))
        except env.DifyError as exc:
            return _error(500, exc)
        except redis.exceptions.RedisError as exc:
            return _error(500, env.internal_error(f"cannot publish the request: {exc}"))
        return await self._answer(command.request_id)

    async def _hook(self, hook_id: str) -> Hook | None:
        if not hook_id or len(hook_id) > 127:
            return None
        row = await self.deps.pool.fetchrow(_LOOKUP, hook_id)
        if row is None:
            return None
        return Hook(
            endpoint_id=row["endpoint_id"],
            tenant_id=row["tenant_id"],
            plugin_id=row["plugin_id"],
            enabled=row["enabled"],
            settings=orjson.loads(row["settings"]),
            secrets=orjson.loads(row["secrets"]) if row["secrets"] else {},
        )

    async def _settings(self, hook: Hook) -> dict[str, Any]:
        """The endpoint's settings as the plugin gets them: secret inputs decrypted."""
        if not hook.secrets:
            return hook.settings
        identifier = await self.deps.installed(hook.tenant_id, hook.plugin_id)
        declaration = await declaration_of(self.deps.pool, identifier) if identifier else None
        schema = settings_schema.fields(declaration)
        clear = await self.secrets.decrypted(hook.tenant_id, hook.endpoint_id, hook.secrets, schema)
        return {**hook.settings, **clear}

    async def _publish_if_installed(self, command: TaskCommand) -> bool:
        keys = self.deps.keys
        installed = await self._publish(
            keys=[keys.installed, keys.tasks],
            args=[
                installed_field(command.tenant_id, command.plugin_id),
                "",
                command_fields(command)[CMD_FIELD],
            ],
        )
        return bool(installed)

    async def _answer(self, request_id: str) -> Response:
        """The plugin's answer: status and headers from its first chunks, then the body.

        The SDK sends a plain (not streamed) response as one chunk holding status, headers
        and the whole body: that answers at once, without waiting for the task's end. A
        streamed one is a chunk with status and headers, then body parts until the end.
        """
        deadline = self.deps.settings.task_timeout + RELAY_GRACE_S
        limit = self.deps.settings.endpoint_max_response_size
        batches = task_output(self.deps.redis, self.deps.keys, request_id, deadline)
        status, body = 200, bytearray()
        headers: dict[str, str] = {}
        ended: AnyEvent | bool | None = False
        got_body = whole = False
        async for batch in batches:
            for item in batch:
                if isinstance(item, dict):
                    whole = whole or (not got_body and "status" in item and "result" in item)
                    status, headers = _head(item, status, headers)
                    if "result" in item:
                        got_body = True
                        body += _unhex(item.get("result"))
                else:
                    ended = item
            if got_body or ended is not False:
                break
        if whole or ended is not False:
            await batches.aclose()
        if ended is False and not got_body:
            ended = None  # the output ended without an outcome (cannot happen but for Redis)
        if ended is not False and not got_body and not _succeeded(ended):
            return _error(500, _failure(ended))
        if whole or ended is not False:  # the whole answer is here
            return Response(bytes(body[:limit]), status_code=status, headers=headers)
        return StreamingResponse(
            _rest(bytes(body), batches, limit, request_id), status_code=status, headers=headers
        )


def raw_request(request: Request, hook_id: str, body: bytes) -> bytes:
    """The request as the plugin's SDK parses it: HTTP/1.1 bytes, path after the hook id."""
    scope = request.scope
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    prefix = b"/e/" + hook_id.encode()
    target = raw_path[len(prefix) :] if raw_path.startswith(prefix) else raw_path
    target = target or b"/"
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    headers: list[tuple[bytes, bytes]] = []
    host = b""
    original_host = b""
    hook_url = b""
    proto = b""
    for name, value in scope["headers"]:
        lowered = name.lower()
        if lowered == b"host":
            host = value
        elif lowered == b"x-original-host":
            original_host = value
        elif lowered == b"x-forwarded-proto":
            proto = value
        elif lowered == HOOK_URL_HEADER:
            hook_url = value
        if (
            lowered in _DROPPED
            or lowered.startswith(_DROPPED_PREFIXES)
            or lowered == b"host"
            or b"_" in name
        ):
            continue
        headers.append((name, value))
    host = original_host or host or b"localhost"
    if not hook_url:
        secure = proto.strip().lower() == b"https" or scope.get("scheme") == "https"
        scheme = b"https" if secure else b"http"
        hook_url = scheme + b"://" + host + b"/e/" + hook_id.encode() + target.split(b"?", 1)[0]
        headers.append((b"Dify-Hook-Url", hook_url))
    headers.append((b"Dify-Hook-Id", hook_id.encode()))
    headers.append((b"Content-Length", str(len(body)).encode()))
    method = request.method.encode()
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host]
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def _body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None when it is over ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _head(item: dict[str, Any], status: int, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    raw_status = item.get("status")
    if isinstance(raw_status, int) and 100 <= raw_status <= 599:
        status = raw_status
    raw_headers = item.get("headers")
    if isinstance(raw_headers, dict):
        headers = {
            **headers,
            **{
                str(k): str(v)
                for k, v in raw_headers.items()
                if str(k).lower() not in _HOP_BY_HOP and "\n" not in f"{k}{v}"
            },
        }
    return status, headers


def _unhex(value: Any) -> bytes:
    if not isinstance(value, str):
        return b""
    try:
        return binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        log.warning("A plugin endpoint answered a body part that is not hex; dropped")
        return b""


def _succeeded(ended: AnyEvent | bool | None) -> bool:
    return isinstance(ended, TaskSucceeded)


def _failure(ended: AnyEvent | bool | None) -> env.DifyError:
    if ended is None or isinstance(ended, bool):
        return env.timeout_error()
    return terminal_error(ended) or env.internal_error("the endpoint answered nothing")


async def _rest(
    head: bytes,
    batches: AsyncGenerator[Batch],
    limit: int,
    request_id: str,
) -> AsyncIterator[bytes]:
    sent = 0
    try:
        if head:
            sent = min(len(head), limit)
            yield head[:limit]
        async for batch in batches:
            data = b"".join(_unhex(i.get("result")) for i in batch if isinstance(i, dict))
            if data and sent < limit:
                piece = data[: limit - sent]
                sent += len(piece)
                yield piece
                if sent >= limit:
                    log.warning(
                        "Endpoint answer of request_id=%s cut at the %d-byte limit",
                        request_id,
                        limit,
                    )
    finally:
        await batches.aclose()


def _error(status: int, err: env.DifyError) -> Response:
    response = env.error(err)
    response.status_code = status
    return response
