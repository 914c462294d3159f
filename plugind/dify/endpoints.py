"""``/plugin/{tenant}/endpoint/…``: a tenant's plugin endpoints (DIFY-DAEMON-API.md §5).

An endpoint is a plugin's HTTP hook, reached at ``/e/{hook_id}/…`` (:mod:`plugind.dify.hooks`).
Its settings are state, so every change is an event (``endpoint.set_up``, ``updated``,
``enabled``, ``disabled``, ``removed``) appended by the node that took Dify's call, and the
``endpoints`` read model is their fold. An answer waits (briefly) until the projector has
applied the event, so the list Dify reads next shows the change.

Secret inputs never reach the event log: events and the read model hold them masked, and their
values, encrypted by Dify (its inner API, ``invoke/encrypt``, namespace ``endpoint``, as the
upstream daemon does), are kept in ``endpoint_secrets``. Setting up an endpoint whose settings
have a secret therefore needs ``DIFY_INNER_API_URL``.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final

import anyio
import asyncpg
import msgspec
import orjson
from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from plugind.backwards import Permission
from plugind.bus.codec import EVENT_FIELD
from plugind.dify import settings_schema as schema_of
from plugind.dify.deps import DifyDeps
from plugind.dify.endpoint_secrets import EndpointSecrets
from plugind.dify.envelope import (
    PLUGIN_PERMISSION_DENIED_ERROR,
    DifyError,
    bad_request,
    not_found,
    ok,
    plugin_not_found,
)
from plugind.dify.management import checked_identifier, guarded, json_body, paging, tenant
from plugind.messages import (
    EndpointDisabled,
    EndpointEnabled,
    EndpointEvent,
    EndpointRemoved,
    EndpointSetUp,
    EndpointUpdated,
    EventFactory,
    encode,
)
from plugind.projections._db import Executor
from plugind.projections.queries import rfc3339

log = logging.getLogger(__name__)

PROJECTION_WAIT_S: Final = 10.0
EXPIRES: Final = "2050-01-01T00:00:00Z"  # upstream's fixed expiry of every endpoint
Name = Annotated[str, Meta(min_length=1, max_length=127)]
EndpointId = Annotated[str, Meta(min_length=1, max_length=64)]


class SetupRequest(Struct):
    plugin_unique_identifier: Annotated[str, Meta(min_length=1, max_length=512)]
    name: Name
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    user_id: str = ""


class UpdateRequest(Struct):
    endpoint_id: EndpointId
    name: Name
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    user_id: str = ""


class EndpointRequest(Struct):
    endpoint_id: EndpointId
    user_id: str = ""


@dataclass(frozen=True, slots=True)
class EndpointRow:
    endpoint_id: str
    tenant_id: str
    plugin_id: str
    hook_id: str
    name: str
    user_id: str
    enabled: bool
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime


_COLUMNS: Final = """
e.endpoint_id, e.tenant_id, e.plugin_id, e.hook_id, e.name, e.user_id, e.enabled,
e.settings::text AS settings, e.created_at, e.updated_at
"""


def _row(record: asyncpg.Record) -> EndpointRow:
    return EndpointRow(
        **{k: record[k] for k in EndpointRow.__dataclass_fields__ if k != "settings"},
        settings=orjson.loads(record["settings"]),
    )


async def get_endpoint(conn: Executor, tenant_id: str, endpoint_id: str) -> EndpointRow | None:
    record = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM endpoints e WHERE e.tenant_id = $1 AND e.endpoint_id = $2",
        tenant_id,
        endpoint_id,
    )
    return _row(record) if record is not None else None


async def declaration_of(conn: Executor, identifier: str) -> dict[str, Any] | None:
    """The stored declaration of ``identifier`` (not the package bytes)."""
    raw = await conn.fetchval(
        "SELECT declaration::text FROM packages WHERE identifier = $1"
        " ORDER BY created_at DESC LIMIT 1",
        identifier,
    )
    return orjson.loads(raw) if raw is not None else None


class Endpoints:
    """The endpoint management routes over one :class:`DifyDeps`."""

    def __init__(self, deps: DifyDeps) -> None:
        self.deps = deps
        self.events = EventFactory(deps.settings.node)
        self.secrets = EndpointSecrets(deps.pool, deps.inner_api)

    def routes(self) -> list[BaseRoute]:
        base = "/plugin/{tenant_id}/endpoint"
        return [
            Route(f"{base}/setup", guarded(self.setup), methods=["POST"]),
            Route(f"{base}/update", guarded(self.update), methods=["POST"]),
            Route(f"{base}/remove", guarded(self.remove), methods=["POST"]),
            Route(f"{base}/enable", guarded(self.enable), methods=["POST"]),
            Route(f"{base}/disable", guarded(self.disable), methods=["POST"]),
            Route(f"{base}/list", guarded(self.list_all), methods=["GET"]),
            Route(f"{base}/list/plugin", guarded(self.list_plugin), methods=["GET"]),
        ]

    # -- changes --------------------------------------------------------------------------------

    async def setup(self, request: Request) -> Response:
        tenant_id = tenant(request)
        body = await json_body(request, SetupRequest)
        identifier = checked_identifier(body.plugin_unique_identifier)
        plugin_id = identifier.split(":", 1)[0]
        if await self.deps.installed(tenant_id, plugin_id) != identifier:
            raise plugin_not_found(f"plugin {identifier} is not installed for this tenant")
        declaration = await declaration_of(self.deps.pool, identifier)
        if declaration is None:
            raise plugin_not_found(f"plugin {identifier} is not in the package store")
        if not Permission.from_declaration(declaration).allows("endpoint"):
            raise DifyError(
                PLUGIN_PERMISSION_DENIED_ERROR,
                "permission denied, you need to enable endpoint access in plugin manifest",
            )
        if not isinstance(declaration.get("endpoint"), dict):
            raise bad_request("plugin does not have an endpoint")
        schema = schema_of.fields(declaration)
        _validate(body.settings, schema)
        endpoint_id, hook_id = str(uuid.uuid4()), secrets.token_hex(16)
        secret_names = schema_of.secret_names(schema)
        _plain, secret = schema_of.split(body.settings, secret_names)
        if secret:
            await self.secrets.keep(tenant_id, body.user_id, endpoint_id, secret, schema)
        event = self._event(
            EndpointSetUp,
            tenant_id,
            endpoint_id=endpoint_id,
            plugin_id=plugin_id,
            hook_id=hook_id,
            name=body.name,
            settings=schema_of.masked(body.settings, secret_names),
            user_id=body.user_id,
        )
        await self._commit(event)
        log.info(
            "Endpoint set up: %s for %s, tenant=%s, hook_id=%s…",
            endpoint_id,
            plugin_id,
            tenant_id,
            hook_id[:6],
        )
        return ok(True)

    async def update(self, request: Request) -> Response:
        tenant_id = tenant(request)
        body = await json_body(request, UpdateRequest)
        current = await self._existing(tenant_id, body.endpoint_id)
        identifier = await self.deps.installed(tenant_id, current.plugin_id)
        if identifier is None:
            raise plugin_not_found(f"failed to find plugin installation of {current.plugin_id}")
        declaration = await declaration_of(self.deps.pool, identifier)
        if declaration is None or not isinstance(declaration.get("endpoint"), dict):
            raise bad_request("plugin does not have an endpoint")
        schema = schema_of.fields(declaration)
        secret_names = schema_of.secret_names(schema)
        _validate(body.settings, schema)
        # A secret sent back exactly as the list showed it (masked) is one the user kept.
        changed = {
            name: value
            for name, value in schema_of.split(body.settings, secret_names)[1].items()
            if value != current.settings.get(name)
        }
        kept = {name for name in secret_names if name in body.settings and name not in changed}
        stored = await self.secrets.stored(current.endpoint_id)
        still = {name: value for name, value in stored.items() if name in kept}
        await self.secrets.keep(
            tenant_id, body.user_id, current.endpoint_id, changed, schema, kept=still or None
        )
        if stored:
            await self.secrets.clear_cache(tenant_id, current.endpoint_id)
        settings = schema_of.masked(body.settings, secret_names)
        for name in kept:
            settings[name] = current.settings.get(name)
        event = self._event(
            EndpointUpdated,
            tenant_id,
            endpoint_id=current.endpoint_id,
            plugin_id=current.plugin_id,
            hook_id=current.hook_id,
            name=body.name,
            settings=settings,
            user_id=body.user_id or current.user_id,
        )
        await self._commit(event)
        return ok(True)

    async def remove(self, request: Request) -> Response:
        tenant_id = tenant(request)
        body = await json_body(request, EndpointRequest)
        current = await self._existing(tenant_id, body.endpoint_id)
        await self._commit(self._state_event(EndpointRemoved, current))
        await self.secrets.forget(tenant_id, current.endpoint_id)
        log.info("Endpoint removed: %s, tenant=%s", current.endpoint_id, tenant_id)
        return ok(True)

    async def enable(self, request: Request) -> Response:
        return await self._switch(request, enabled=True)

    async def disable(self, request: Request) -> Response:
        return await self._switch(request, enabled=False)

    async def _switch(self, request: Request, *, enabled: bool) -> Response:
        tenant_id = tenant(request)
        body = await json_body(request, EndpointRequest)
        current = await self._existing(tenant_id, body.endpoint_id)
        if current.enabled != enabled:
            kind = EndpointEnabled if enabled else EndpointDisabled
            await self._commit(self._state_event(kind, current))
        return ok(True)

    # -- lists ----------------------------------------------------------------------------------

    async def list_all(self, request: Request) -> Response:
        tenant_id = tenant(request)
        page, size = paging(request)
        return ok(await self._list(tenant_id, None, page, size))

    async def list_plugin(self, request: Request) -> Response:
        tenant_id = tenant(request)
        plugin_id = request.query_params.get("plugin_id") or ""
        if not plugin_id:
            raise bad_request("`plugin_id` is required")
        page, size = paging(request)
        return ok(await self._list(tenant_id, plugin_id, page, size))

    async def _list(
        self, tenant_id: str, plugin_id: str | None, page: int, size: int
    ) -> list[dict[str, Any]]:
        rows = await self.deps.pool.fetch(
            f"""
            SELECT {_COLUMNS}, pkg.endpoint
            FROM endpoints e
            LEFT JOIN plugins p ON p.tenant_id = e.tenant_id AND p.plugin_id = e.plugin_id
                               AND p.status = 'installed'
            LEFT JOIN LATERAL (
                SELECT (declaration -> 'endpoint')::text AS endpoint FROM packages
                WHERE identifier = p.identifier ORDER BY created_at DESC LIMIT 1
            ) pkg ON true
            WHERE e.tenant_id = $1 AND ($2::text IS NULL OR e.plugin_id = $2)
            ORDER BY e.created_at, e.endpoint_id
            LIMIT {int(size)} OFFSET {int((page - 1) * size)}
            """,
            tenant_id,
            plugin_id,
        )
        return [
            _entity(_row(r), orjson.loads(r["endpoint"]) if r["endpoint"] else None) for r in rows
        ]

    # -- helpers --------------------------------------------------------------------------------

    async def _existing(self, tenant_id: str, endpoint_id: str) -> EndpointRow:
        current = await get_endpoint(self.deps.pool, tenant_id, endpoint_id)
        if current is None:
            raise not_found("endpoint not found")
        return current

    def _event(self, kind: type[EndpointEvent], tenant_id: str, **fields: Any) -> EndpointEvent:
        return self.events(
            kind, request_id=f"endpoint:{uuid.uuid4()}", tenant_id=tenant_id, **fields
        )

    def _state_event(self, kind: type[EndpointEvent], current: EndpointRow) -> EndpointEvent:
        return self._event(
            kind,
            current.tenant_id,
            endpoint_id=current.endpoint_id,
            plugin_id=current.plugin_id,
            hook_id=current.hook_id,
            name=current.name,
            settings=current.settings,
            user_id=current.user_id,
        )

    async def _commit(self, event: EndpointEvent) -> None:
        """Append ``event`` and wait (briefly) until the projector has applied it."""
        await self.deps.redis.xadd(self.deps.keys.events, {EVENT_FIELD: encode(event)})
        with anyio.move_on_after(PROJECTION_WAIT_S):
            while not await self.deps.pool.fetchval(
                "SELECT 1 FROM event_log WHERE event_id = $1", event.event_id
            ):
                await anyio.sleep(0.02)


def _validate(settings: dict[str, Any], schema: list[dict[str, Any]]) -> None:
    try:
        schema_of.validate(settings, schema)
    except schema_of.SettingsError as exc:
        raise bad_request(f"failed to validate settings: {exc}") from None


def _entity(row: EndpointRow, group: Any) -> dict[str, Any]:
    """Dify's ``EndpointEntityWithInstance`` (``api/core/plugin/entities/endpoint.py``)."""
    if isinstance(group, dict):
        declaration = {
            "settings": [s for s in group.get("settings") or [] if isinstance(s, dict)],
            "endpoints": [
                {"path": e.get("path"), "method": e.get("method"), "hidden": bool(e.get("hidden"))}
                for e in group.get("endpoints") or []
                if isinstance(e, dict)
            ],
        }
        settings = row.settings
    else:  # the plugin is no longer installed: as upstream, no settings and no declaration
        declaration = {"settings": [], "endpoints": []}
        settings = {}
    return {
        "id": row.endpoint_id,
        "created_at": rfc3339(row.created_at) or "",
        "updated_at": rfc3339(row.updated_at) or "",
        "tenant_id": row.tenant_id,
        "plugin_id": row.plugin_id,
        "expired_at": EXPIRES,
        "declaration": declaration,
        "settings": settings,
        "name": row.name,
        "enabled": row.enabled,
        "hook_id": row.hook_id,
    }
