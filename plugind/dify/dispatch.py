"""``POST /plugin/{tenant_id}/dispatch/<route>``: Dify invoking a plugin, as a streamed task.

Every route is the same three steps, whatever the plugin category (``access.ROUTES`` names the
access type and action of each):

1. check the request: a known route, ``X-Plugin-ID`` (``author/name`` or a full identifier) and
   a JSON body ``{user_id?, conversation_id?, app_id?, message_id?, endpoint_id?, context?,
   data}``; and that the tenant has that plugin installed (else one ``PluginNotFoundError``
   frame, and nothing is published);
2. publish one task command with ``payload = data``, the context fields passed through and
   ``"stream": true``;
3. relay the task's live output (``{ns}:out:<request_id>``) as SSE frames until its outcome.

The event log records the call like any other task: ``task.started``, then the terminal event
with every chunk.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec
import redis.exceptions
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from plugind.bus.codec import CMD_FIELD, command_fields
from plugind.bus.keys import installed_field
from plugind.dify import envelope as env
from plugind.dify.access import DispatchRoute, lookup
from plugind.dify.deps import DifyDeps
from plugind.dify.stream import SSEResponse, relay
from plugind.errors import PlugindError
from plugind.messages import TaskCommand
from plugind.package.difypkg import parse_identifier

log = logging.getLogger(__name__)

PLUGIN_ID_HEADER: Final = "x-plugin-id"
# A dispatch body carries what the plugin needs; speech2text sends the audio file hex-encoded.
MAX_BODY: Final = 64 * 1024 * 1024
# How long past the task's own timeout the relay waits for an outcome (the task may first wait
# in the queue) before it answers with upstream's timeout frame.
RELAY_GRACE_S: Final = 30.0


class DispatchBody(msgspec.Struct, forbid_unknown_fields=False):
    """What dify-api posts to every dispatch route (``api/core/plugin/impl/*.py``)."""

    data: dict[str, Any]
    user_id: str | None = None
    conversation_id: str | None = None
    app_id: str | None = None
    message_id: str | None = None
    endpoint_id: str | None = None
    context: dict[str, Any] | None = None


_decoder = msgspec.json.Decoder(DispatchBody)

# KEYS: 1 installed hash, 2 tasks stream. ARGV: 1 the tenant's field, 2 the identifier asked for
# ("" for whatever is installed), 3 the command's JSON. Returns the installed identifier, or
# false (and publishes nothing) when the tenant does not have it.
PUBLISH_IF_INSTALLED: Final = """
local installed = redis.call('HGET', KEYS[1], ARGV[1])
if not installed or (ARGV[2] ~= '' and installed ~= ARGV[2]) then
  return false
end
redis.call('XADD', KEYS[2], '*', 'cmd', ARGV[3])
return installed
"""


class _Dispatcher:
    def __init__(self, deps: DifyDeps) -> None:
        self.deps = deps
        self._publish = deps.redis.register_script(PUBLISH_IF_INSTALLED)

    async def handle(self, request: Request) -> Response:
        tenant_id: str = request.path_params["tenant_id"]
        path: str = request.path_params["path"]
        route = lookup(path)
        if route is None:
            return _json_error(
                env.not_found(f"no dispatch route {path!r}: plugind serves upstream's routes"),
                status=404,
            )
        plugin_ref = request.headers.get(PLUGIN_ID_HEADER, "").strip()
        if not plugin_ref:
            return env.error(env.bad_request("the X-Plugin-ID header is required"))
        try:
            body = await _read_body(request)
        except env.DifyError as exc:
            return env.error(exc)
        try:
            plugin_id, wanted = _plugin_id(plugin_ref)
            command = self._command(tenant_id, plugin_id, route, body)
            await self._publish_if_installed(command, wanted)
        except env.DifyError as exc:
            return SSEResponse(_one(env.sse_error(exc)))
        except redis.exceptions.RedisError as exc:
            return env.error(env.internal_error(f"cannot publish the task: {exc}"))
        log.debug(
            "Dify dispatch %s -> %s %s/%s, request_id=%s",
            path,
            plugin_id,
            route.access,
            route.action,
            command.request_id,
        )
        deadline = self.deps.settings.task_timeout + RELAY_GRACE_S
        frames = relay(self.deps.redis, self.deps.keys, command.request_id, deadline_s=deadline)
        return SSEResponse(frames, headers={"X-Plugind-Request-Id": command.request_id})

    async def _publish_if_installed(self, command: TaskCommand, wanted: str) -> None:
        """Publish ``command`` if its tenant has its plugin installed (that very identifier when
        ``wanted`` is not empty), else ``PluginNotFoundError`` and nothing is published.

        One script, so the check (the same ``installed`` hash ``DifyDeps.installed`` reads, which
        the workers resolve against) and the XADD are one round trip and one atomic step.
        """
        keys = self.deps.keys
        installed = await self._publish(
            keys=[keys.installed, keys.tasks],
            args=[
                installed_field(command.tenant_id, command.plugin_id),
                wanted,
                command_fields(command)[CMD_FIELD],
            ],
        )
        if not installed:
            raise env.plugin_not_found(
                f"plugin {wanted or command.plugin_id} is not installed "
                f"for tenant {command.tenant_id}"
            )

    def _command(
        self, tenant_id: str, plugin_id: str, route: DispatchRoute, body: DispatchBody
    ) -> TaskCommand:
        return TaskCommand(
            request_id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            plugin_id=plugin_id,
            access=route.access,
            action=route.action,
            payload=body.data,
            user_id=body.user_id or "",
            conversation_id=body.conversation_id,
            message_id=body.message_id,
            app_id=body.app_id,
            endpoint_id=body.endpoint_id,
            context=body.context,
            stream=True,
        )


def _plugin_id(plugin_ref: str) -> tuple[str, str]:
    """``(author/name, the full identifier asked for or "")`` of an ``X-Plugin-ID``."""
    if ":" in plugin_ref or "@" in plugin_ref:
        try:
            author, name, _version, _checksum = parse_identifier(plugin_ref)
        except PlugindError:
            raise env.plugin_not_found(f"plugin {plugin_ref[:200]!r} not found") from None
        return f"{author}/{name}", plugin_ref
    if plugin_ref.count("/") != 1 or not all(plugin_ref.split("/")) or len(plugin_ref) > 256:
        raise env.plugin_not_found(f"plugin {plugin_ref[:200]!r} not found")
    return plugin_ref, ""


async def _read_body(request: Request) -> DispatchBody:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise env.bad_request(f"the body is over the {MAX_BODY}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise env.bad_request(f"the body is over the {MAX_BODY}-byte limit")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise env.bad_request("the body is empty: expected a JSON object with `data`")
    try:
        return _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise env.bad_request(f"invalid dispatch body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise env.bad_request(f"the body is not JSON: {exc}") from None


async def _one(frame: bytes) -> AsyncIterator[bytes]:
    yield frame


def _json_error(err: env.DifyError, *, status: int) -> Response:
    response = env.error(err)
    response.status_code = status
    return response


def dispatch_routes(deps: DifyDeps) -> list[BaseRoute]:
    """The dispatch routes, for ``plugind.dify.app`` to mount (behind its X-Api-Key check)."""
    return [
        Route(
            "/plugin/{tenant_id}/dispatch/{path:path}",
            _Dispatcher(deps).handle,
            methods=["POST"],
            name="dify_dispatch",
        )
    ]
