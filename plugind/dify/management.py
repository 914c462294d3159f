"""``/plugin/{tenant}/management/…``: Dify's plugin management, mapped onto plugind.

- upload stores a verified package in the package store (nothing is installed yet);
- install (from identifiers, or an upgrade) is one ``install`` command per plugin, with request
  ids ``<task id>:<n>``, and an install task whose status is folded from their events;
- uninstall is an ``uninstall`` command, answered once it has ended;
- lists read the ``plugins`` read model and each package's declaration, with icons as asset
  ids; an installation's id is derived from (tenant, plugin), so it is stable and needs no row.

Every answer is the Dify envelope: failures are HTTP 200 with a negative ``code`` (see
:mod:`plugind.dify.envelope`); only a bad key or an unknown route get an HTTP error status.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Final, TypeVar

import anyio
import asyncpg
import msgspec
import orjson
import redis.exceptions
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from plugind.bus.codec import text
from plugind.bus.keys import installed_field
from plugind.client import WaitTimeout
from plugind.dify import assets, declarations, install_tasks, shapes
from plugind.dify.deps import DifyDeps
from plugind.dify.envelope import (
    PLUGIN_UNIQUE_IDENTIFIER_ERROR,
    DifyError,
    bad_request,
    error,
    internal_error,
    not_found,
    ok,
    plugin_not_found,
)
from plugind.errors import PlugindError
from plugind.messages import (
    CommandRejected,
    InstallCommand,
    PackageRef,
    UninstallCommand,
    Uninstalled,
)
from plugind.package.difypkg import PluginPackage, parse_identifier, read_package
from plugind.package.signature import SignatureInfo, verify_signature
from plugind.projections._db import Conn
from plugind.projections.package_store import get_package_by_identifier, store_package
from plugind.projections.queries import (
    InstalledPackageRow,
    count_plugins,
    installed_with_packages,
    list_plugins,
    plugin_status,
    rfc3339,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]

MAX_JSON_BODY: Final = 1024 * 1024
MULTIPART_OVERHEAD: Final = 64 * 1024
MAX_PAGE_SIZE: Final = 256
UNINSTALL_WAIT_S: Final = 30.0
PROJECTION_WAIT_S: Final = 10.0
SOURCES: Final = ("package", "marketplace", "github", "remote")
# A fixed namespace: an installation id is uuid5(tenant ‖ plugin), the same on every node.
_INSTALLATION_NS: Final = uuid.UUID("4a1b6c1e-8f1d-4d8e-9a57-0b7f0c3e6a21")
_TENANT_MAX: Final = 128


def installation_id(tenant_id: str, plugin_id: str) -> str:
    """The stable id of a tenant's installation of ``author/name`` (Dify sends it back)."""
    return str(uuid.uuid5(_INSTALLATION_NS, f"{tenant_id}\x1f{plugin_id}"))


def _provider_row_id(tenant_id: str, plugin_id: str, kind: str) -> str:
    return str(uuid.uuid5(_INSTALLATION_NS, f"{tenant_id}\x1f{plugin_id}\x1f{kind}"))


@dataclass(frozen=True, slots=True)
class InstalledPlugin(InstalledPackageRow):
    """A tenant's installed plugin, with its package's declaration, in Dify's shapes."""

    @property
    def installation_id(self) -> str:
        return installation_id(self.tenant_id, self.plugin_id)

    @property
    def checksum(self) -> str:
        return self.identifier.rsplit("@", 1)[-1]

    def dify_declaration(self) -> dict[str, Any]:
        return declarations.for_dify(self.declaration, self.sha256)

    def installation(self) -> shapes.PluginInstallation:
        return shapes.PluginInstallation(
            id=self.installation_id,
            created_at=_time(self.installed_at),
            updated_at=_time(self.updated_at),
            tenant_id=self.tenant_id,
            endpoints_setups=self.endpoints_setups,
            endpoints_active=self.endpoints_active,
            runtime_type="local",
            source=self.source,
            meta=self.meta,
            plugin_id=self.plugin_id,
            plugin_unique_identifier=self.identifier,
            version=self.version,
            checksum=self.checksum,
            declaration=self.dify_declaration(),
        )

    def entity(self) -> shapes.PluginEntity:
        base = self.installation()
        return shapes.PluginEntity(
            **{f: getattr(base, f) for f in base.__struct_fields__},
            name=str(self.declaration.get("name", self.plugin_id.split("/")[-1])),
            installation_id=self.installation_id,
        )

    def provider_row(self, kind: str) -> shapes.ProviderRow | None:
        name = declarations.provider_name(self.declaration, kind)
        if name is None:
            return None
        common: dict[str, Any] = {
            "id": _provider_row_id(self.tenant_id, self.plugin_id, kind),
            "created_at": _time(self.installed_at),
            "updated_at": _time(self.updated_at),
            "tenant_id": self.tenant_id,
            "provider": name,
            "plugin_unique_identifier": self.identifier,
            "plugin_id": self.plugin_id,
            "declaration": self.dify_declaration()[kind],
        }
        if kind == "agent_strategy":
            return shapes.AgentStrategyRow(**common, meta=self.declaration.get("meta") or {})
        if kind == "datasource":
            return shapes.DatasourceRow(**common)
        return shapes.ProviderRow(**common)


async def installed_plugins(
    conn: Conn,
    tenant_id: str,
    *,
    plugin_ids: list[str] | None = None,
    page: tuple[int, int] | None = None,
) -> list[InstalledPlugin]:
    """The tenant's installed plugins, oldest install first (a page of them if ``page``)."""
    rows = await installed_with_packages(conn, tenant_id, plugin_ids=plugin_ids, page=page)
    return [InstalledPlugin(**{f.name: getattr(row, f.name) for f in fields(row)}) for row in rows]


class Management:
    """The management routes over one :class:`DifyDeps`."""

    def __init__(self, deps: DifyDeps) -> None:
        self.deps = deps
        self.assets = assets.AssetCache()

    def routes(self) -> list[BaseRoute]:
        base = "/plugin/{tenant_id}/management"
        get, post = ["GET"], ["POST"]
        table: list[tuple[str, Handler, list[str]]] = [
            ("/install/upload/package", self.upload_package, post),
            ("/install/upload/bundle", self.upload_bundle, post),
            ("/install/identifiers", self.install_identifiers, post),
            ("/install/upgrade", self.upgrade, post),
            ("/install/tasks", self.list_tasks, get),
            ("/install/tasks/delete_all", self.delete_all_tasks, post),
            ("/install/tasks/{task_id}", self.get_task, get),
            ("/install/tasks/{task_id}/delete", self.delete_task, post),
            ("/install/tasks/{task_id}/delete/{identifier:path}", self.delete_task_item, post),
            ("/decode/from_identifier", self.decode, get),
            ("/fetch/identifier", self.fetch_identifier, get),
            ("/fetch/manifest", self.fetch_manifest, get),
            ("/fetch/readme", self.fetch_readme, get),
            ("/list", self.list_plugins, get),
            ("/installation/fetch/batch", self.fetch_batch, post),
            ("/installation/missing", self.missing, post),
            ("/tools", self._provider_list("tool"), get),
            ("/tool", self._provider_one("tool"), get),
            ("/tools/check_existence", self.check_tools, post),
            ("/models", self._provider_list("model"), get),
            ("/agent_strategies", self._provider_list("agent_strategy"), get),
            ("/agent_strategy", self._provider_one("agent_strategy"), get),
            ("/datasources", self._provider_list("datasource"), get),
            ("/datasource", self._provider_one("datasource"), get),
            ("/triggers", self._provider_list("trigger"), get),
            ("/trigger", self._provider_one("trigger"), get),
            ("/uninstall", self.uninstall, post),
        ]
        routes: list[BaseRoute] = [
            Route(base + path, guarded(handler), methods=methods)
            for path, handler, methods in table
        ]
        routes.append(Route("/plugin/{tenant_id}/asset/{asset_id}", self.asset, methods=get))
        return routes

    # -- upload and decode ----------------------------------------------------------------------

    async def upload_package(self, request: Request) -> Response:
        tenant(request)
        limit = self.deps.settings.max_package_size
        too_big = bad_request(f"file size exceeds the maximum limit of {limit} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
            raise too_big
        guarded_request = Request(request.scope, _limited(request.receive, limit, too_big))
        try:
            async with guarded_request.form(max_files=4, max_fields=16) as form:
                upload = form.get("dify_pkg")
                if not isinstance(upload, UploadFile):
                    raise bad_request(
                        "the multipart field `dify_pkg` (the package file) is missing"
                    )
                data = await upload.read(limit + 1)
                wants_signature = str(form.get("verify_signature") or "").lower() == "true"
        except MultiPartException as exc:
            raise bad_request(f"the body is not a valid multipart form: {exc.message}") from None
        if len(data) > limit:
            raise too_big
        package = await anyio.to_thread.run_sync(lambda: read_package(data, max_size=limit))
        signed = await self._verify(
            data, required=wants_signature or self.deps.settings.verify_signature
        )
        await store_package(self.deps.pool, package)
        log.info(
            "Dify upload: %s (%d bytes, sha256 %s), tenant=%s, signature=%s",
            package.identifier,
            len(data),
            package.sha256[:12],
            request.path_params["tenant_id"],
            "verified" if signed else "not verified",
        )
        return ok(shapes.to_builtins(self._decoded(package.identifier, package, signed)))

    async def upload_bundle(self, request: Request) -> Response:
        tenant(request)
        raise bad_request(
            "plugin bundles (.difybndl) are not supported by plugind: install the packages of "
            "the bundle one by one"
        )

    async def decode(self, request: Request) -> Response:
        tenant(request)
        identifier = await self._identifier_from(request)
        stored = await get_package_by_identifier(self.deps.pool, identifier)
        if stored is None:
            raise not_found(f"package {identifier} is not on this daemon: upload it first")
        package = await anyio.to_thread.run_sync(
            lambda: read_package(stored.data, max_size=max(len(stored.data), 1))
        )
        signed = await self._verify(stored.data, required=False)
        return ok(shapes.to_builtins(self._decoded(identifier, package, signed)))

    async def fetch_identifier(self, request: Request) -> Response:
        tenant(request)
        identifier = await self._identifier_from(request)
        return ok(await get_package_by_identifier(self.deps.pool, identifier) is not None)

    async def fetch_manifest(self, request: Request) -> Response:
        tenant(request)
        identifier = await self._identifier_from(request)
        stored = await get_package_by_identifier(self.deps.pool, identifier)
        if stored is None:
            raise not_found(f"package {identifier} is not on this daemon")
        return ok(declarations.for_dify(stored.declaration, stored.sha256))

    async def fetch_readme(self, request: Request) -> Response:
        tenant(request)
        identifier = await self._identifier_from(request)
        language = request.query_params.get("language") or "en_US"
        stored = await get_package_by_identifier(self.deps.pool, identifier)
        if stored is None:
            raise not_found(f"package {identifier} is not on this daemon")
        paths: tuple[str, ...] = ("README.md",)
        if language != "en_US":
            paths = (f"readme/README_{language}.md", *paths)
        content = await anyio.to_thread.run_sync(assets.read_file, stored.data, paths)
        readme = content.decode("utf-8", "replace") if content else ""
        return ok(shapes.to_builtins(shapes.Readme(content=readme, language=language)))

    def _decoded(
        self, identifier: str, package: PluginPackage, signed: SignatureInfo | None
    ) -> shapes.DecodeResponse:
        verification = None
        if signed is not None:
            verification = shapes.Verification(
                authorized_category=signed.authorized_category or "langgenius"  # type: ignore[arg-type]
            )
        return shapes.DecodeResponse(
            unique_identifier=identifier,
            manifest=declarations.for_dify(
                package.declaration, package.sha256, verified=signed is not None
            ),
            verification=verification,
        )

    async def _verify(self, data: bytes, *, required: bool) -> SignatureInfo | None:
        """The package's signature if a trusted key accepts it; refusal if it is ``required``."""
        keys = self.deps.signature_keys
        if not keys:
            if required:
                raise bad_request(
                    "plugin signature verification was asked for, but this daemon trusts no "
                    "signing key (set PLUGIN_SIGNATURE_PUBLIC_KEYS)"
                )
            return None
        try:
            return await anyio.to_thread.run_sync(lambda: verify_signature(data, keys))
        except PlugindError as exc:
            if required:
                raise bad_request(
                    "plugin verification has been enabled, and the plugin you want to install "
                    f"has a bad signature: {exc.message}"
                ) from None
            return None

    async def _identifier_from(self, request: Request) -> str:
        """``plugin_unique_identifier`` from a JSON body (even on a GET) or the query string."""
        value: Any = None
        raw = await _read_body(request)
        if raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise bad_request(f"the body is not JSON: {exc}") from None
            if isinstance(body, dict):
                value = body.get("plugin_unique_identifier")
        if value is None:
            value = request.query_params.get("plugin_unique_identifier")
        if not isinstance(value, str) or not value:
            raise bad_request("`plugin_unique_identifier` is required")
        return checked_identifier(value)

    # -- install, upgrade, tasks ----------------------------------------------------------------

    async def install_identifiers(self, request: Request) -> Response:
        tenant_id = tenant(request)
        body = await json_body(request, shapes.InstallIdentifiersRequest)
        source = checked_source(body.source)
        metas = list(body.metas or [])
        identifiers = [checked_identifier(i) for i in body.plugin_unique_identifiers]
        plugin_ids = [_plugin_id(i) for i in identifiers]
        if len(set(plugin_ids)) != len(plugin_ids):
            raise bad_request("each plugin may appear once in `plugin_unique_identifiers`")
        stored = [await self._stored_sha256(i) for i in identifiers]
        current = await self._installed_many(tenant_id, plugin_ids)
        if all(current[p] == i for p, i in zip(plugin_ids, identifiers, strict=True)):
            return ok(shapes.to_builtins(shapes.InstallStartResponse(True, "")))
        task_id = install_tasks.new_task_id()
        items = [
            install_tasks.TaskItem(
                identifier=identifier,
                plugin_id=plugin_id,
                request_id=(
                    None
                    if current[plugin_id] == identifier
                    else install_tasks.request_id_for(task_id, index)
                ),
                sha256=sha256,
                source=source,
                meta=(metas[index] if index < len(metas) else None) or {},
            )
            for index, (identifier, plugin_id, sha256) in enumerate(
                zip(identifiers, plugin_ids, stored, strict=True)
            )
        ]
        await self._start(tenant_id, task_id, items)
        return ok(shapes.to_builtins(shapes.InstallStartResponse(False, task_id)))

    async def upgrade(self, request: Request) -> Response:
        tenant_id = tenant(request)
        body = await json_body(request, shapes.UpgradeRequest)
        source = checked_source(body.source)
        original = checked_identifier(body.original_plugin_unique_identifier)
        new = checked_identifier(body.new_plugin_unique_identifier)
        if original == new:
            raise bad_request("original and new plugin unique identifier are the same")
        plugin_id = _plugin_id(new)
        if _plugin_id(original) != plugin_id:
            raise bad_request("original and new plugin id are different")
        sha256 = await self._stored_sha256(new)
        current = await self.deps.installed(tenant_id, plugin_id)
        if current == new:
            return ok(shapes.to_builtins(shapes.InstallStartResponse(True, "")))
        if current != original:
            raise not_found(
                f"plugin installation not found for this tenant: {original} is not installed"
            )
        task_id = install_tasks.new_task_id()
        item = install_tasks.TaskItem(
            identifier=new,
            plugin_id=plugin_id,
            request_id=install_tasks.request_id_for(task_id, 0),
            sha256=sha256,
            source=source,
            meta=body.meta or {},
        )
        await self._start(tenant_id, task_id, [item])
        return ok(shapes.to_builtins(shapes.InstallStartResponse(False, task_id)))

    async def _start(
        self, tenant_id: str, task_id: str, items: list[install_tasks.TaskItem]
    ) -> None:
        """Record the task and where each plugin comes from, then publish the commands."""
        async with self.deps.pool.acquire() as conn, conn.transaction():
            await install_tasks.create_task(conn, task_id, tenant_id, items)
            await conn.executemany(
                """
                INSERT INTO dify_install_sources (tenant_id, identifier, source, meta)
                VALUES ($1, $2, $3, $4::text::jsonb)
                ON CONFLICT (tenant_id, identifier) DO UPDATE SET
                    source = EXCLUDED.source, meta = EXCLUDED.meta, updated_at = now()
                """,
                [(tenant_id, i.identifier, i.source, orjson.dumps(i.meta).decode()) for i in items],
            )
        commands: list[Any] = [
            InstallCommand(
                request_id=item.request_id,
                tenant_id=tenant_id,
                package=PackageRef(sha256=item.sha256),
                expected_identifier=item.identifier,
            )
            for item in items
            if item.request_id is not None
        ]
        await self.deps.client.send_many(commands)
        log.info(
            "Dify install task %s: tenant=%s, %s",
            task_id,
            tenant_id,
            ", ".join(f"{i.identifier} ({i.request_id or 'already installed'})" for i in items),
        )

    async def _stored_sha256(self, identifier: str) -> str:
        stored = await get_package_by_identifier(self.deps.pool, identifier)
        if stored is None:
            raise not_found(f"package {identifier} is not on this daemon: upload it first")
        return stored.sha256

    async def _installed_many(self, tenant_id: str, plugin_ids: list[str]) -> dict[str, str | None]:
        fields = [installed_field(tenant_id, p) for p in plugin_ids]
        values: Any = await self.deps.redis.hmget(self.deps.keys.installed, fields)
        return {p: (text(v) if v else None) for p, v in zip(plugin_ids, values, strict=True)}

    async def get_task(self, request: Request) -> Response:
        tenant_id = tenant(request)
        task_id = request.path_params["task_id"]
        async with self.deps.pool.acquire() as conn:
            task = await install_tasks.get_task(conn, tenant_id, task_id)
        if task is None:
            raise not_found(f"no install task {task_id!r} for this tenant")
        return ok(shapes.to_builtins(task))

    async def list_tasks(self, request: Request) -> Response:
        tenant_id = tenant(request)
        page, size = paging(request)
        async with self.deps.pool.acquire() as conn:
            tasks = await install_tasks.list_tasks(conn, tenant_id, page, size)
        return ok(shapes.to_builtins(tasks))

    async def delete_task(self, request: Request) -> Response:
        await install_tasks.delete_task(
            self.deps.pool, tenant(request), request.path_params["task_id"]
        )
        return ok(True)

    async def delete_all_tasks(self, request: Request) -> Response:
        await install_tasks.delete_all_tasks(self.deps.pool, tenant(request))
        return ok(True)

    async def delete_task_item(self, request: Request) -> Response:
        tenant_id = tenant(request)
        identifier = checked_identifier(request.path_params["identifier"].lstrip("/"))
        async with self.deps.pool.acquire() as conn:
            await install_tasks.delete_task_item(
                conn, tenant_id, request.path_params["task_id"], identifier
            )
        return ok(True)

    # -- installed plugins ----------------------------------------------------------------------

    async def list_plugins(self, request: Request) -> Response:
        tenant_id = tenant(request)
        page, size = paging(request)
        async with self.deps.pool.acquire() as conn:
            total = await count_plugins(conn, tenant_id)
            plugins = await installed_plugins(conn, tenant_id, page=(page, size))
        listed = shapes.PluginList(list=[p.entity() for p in plugins], total=int(total))
        return ok(shapes.to_builtins(listed))

    async def fetch_batch(self, request: Request) -> Response:
        tenant_id = tenant(request)
        body = await json_body(request, shapes.FetchBatchRequest)
        if not body.plugin_ids:
            return ok([])
        async with self.deps.pool.acquire() as conn:
            plugins = await installed_plugins(conn, tenant_id, plugin_ids=body.plugin_ids)
        return ok(shapes.to_builtins([p.installation() for p in plugins]))

    async def missing(self, request: Request) -> Response:
        tenant_id = tenant(request)
        body = await json_body(request, shapes.MissingRequest)
        identifiers = [checked_identifier(i) for i in body.plugin_unique_identifiers]
        current = await self._installed_many(tenant_id, [_plugin_id(i) for i in identifiers])
        result = [
            shapes.MissingDependency(plugin_unique_identifier=i, current_identifier=installed)
            for i in identifiers
            if (installed := current[_plugin_id(i)]) != i
        ]
        return ok(shapes.to_builtins(result))

    async def check_tools(self, request: Request) -> Response:
        tenant_id = tenant(request)
        body = await json_body(request, shapes.CheckExistenceRequest)
        wanted = sorted({ref.plugin_id for ref in body.provider_ids})
        async with self.deps.pool.acquire() as conn:
            plugins = await installed_plugins(conn, tenant_id, plugin_ids=wanted)
        have = {(p.plugin_id, declarations.provider_name(p.declaration, "tool")) for p in plugins}
        return ok([(ref.plugin_id, ref.provider_name) in have for ref in body.provider_ids])

    def _provider_list(self, kind: str) -> Handler:
        async def handler(request: Request) -> Response:
            tenant_id = tenant(request)
            page, size = paging(request)
            async with self.deps.pool.acquire() as conn:
                plugins = await installed_plugins(conn, tenant_id)
            rows = [row for p in plugins if (row := p.provider_row(kind)) is not None]
            return ok(shapes.to_builtins(rows[(page - 1) * size : page * size]))

        return handler

    def _provider_one(self, kind: str) -> Handler:
        async def handler(request: Request) -> Response:
            tenant_id = tenant(request)
            q = request.query_params
            plugin_id, provider = q.get("plugin_id") or "", q.get("provider") or ""
            if not plugin_id or not provider:
                raise bad_request("`plugin_id` and `provider` are required")
            async with self.deps.pool.acquire() as conn:
                plugins = await installed_plugins(conn, tenant_id, plugin_ids=[plugin_id])
            for plugin in plugins:
                row = plugin.provider_row(kind)
                if row is not None and row.provider == provider:
                    return ok(shapes.to_builtins(row))
            raise plugin_not_found(
                f"plugin not found: {plugin_id} with {kind.replace('_', ' ')} provider "
                f"{provider!r} is not installed for this tenant"
            )

        return handler

    # -- uninstall ------------------------------------------------------------------------------

    async def uninstall(self, request: Request) -> Response:
        tenant_id = tenant(request)
        body = await json_body(request, shapes.UninstallRequest)
        wanted = body.plugin_installation_id
        async with self.deps.pool.acquire() as conn:
            rows = await list_plugins(conn, tenant_id=tenant_id)
        plugin_id = next(
            (r.plugin_id for r in rows if installation_id(tenant_id, r.plugin_id) == wanted), None
        )
        if plugin_id is None:
            return ok(True)  # as upstream: nothing installed under that id is already gone
        command = UninstallCommand(
            request_id=f"uninstall:{uuid.uuid4()}", tenant_id=tenant_id, plugin_id=plugin_id
        )
        rid = await self.deps.client.send(command)
        try:
            event = await self.deps.client.wait(rid, timeout=UNINSTALL_WAIT_S)
        except WaitTimeout:
            raise internal_error(
                f"uninstalling {plugin_id} did not finish within {UNINSTALL_WAIT_S:g}s "
                f"(request {rid}); it may still finish"
            ) from None
        if isinstance(event, CommandRejected) and event.error.code != "not_installed":
            raise internal_error(f"failed to uninstall plugin: {event.error.message}")
        if not isinstance(event, Uninstalled | CommandRejected):
            raise internal_error(f"failed to uninstall plugin: request {rid} ended {event!r}")
        await self._until_projected(tenant_id, plugin_id)
        log.info("Dify uninstall: %s, tenant=%s, request_id=%s", plugin_id, tenant_id, rid)
        return ok(True)

    async def _until_projected(self, tenant_id: str, plugin_id: str) -> None:
        """Wait (briefly) until the list no longer shows the plugin, so Dify's refresh agrees."""
        with anyio.move_on_after(PROJECTION_WAIT_S):
            while True:
                if await plugin_status(self.deps.pool, tenant_id, plugin_id) != "installed":
                    return
                await anyio.sleep(0.05)

    # -- assets ---------------------------------------------------------------------------------

    async def asset(self, request: Request) -> Response:
        asset_id = request.path_params["asset_id"]
        try:
            data = await assets.load_asset(self.deps.pool, self.assets, asset_id)
        except (PlugindError, asyncpg.PostgresError, OSError) as exc:
            log.warning("Asset %s cannot be served: %r", asset_id, exc)
            data = None
        if data is None:
            return error_response(404, not_found(f"no asset {asset_id!r}"))
        return Response(
            data,
            media_type=assets.media_type(asset_id),
            headers={"Cache-Control": "public, max-age=31536000, immutable"},
        )


# -- request helpers ------------------------------------------------------------------------------


def tenant(request: Request) -> str:
    tenant_id: str = request.path_params["tenant_id"]
    if not tenant_id or len(tenant_id) > _TENANT_MAX:
        raise bad_request(f"tenant id must be 1 to {_TENANT_MAX} characters")
    return tenant_id


def checked_identifier(value: str) -> str:
    try:
        parse_identifier(value)
    except PlugindError as exc:
        raise DifyError(PLUGIN_UNIQUE_IDENTIFIER_ERROR, exc.message) from None
    return value


def checked_source(value: str) -> str:
    if value not in SOURCES:
        raise bad_request(f"`source` must be one of {', '.join(SOURCES)}, got {value!r}")
    return value


def _plugin_id(identifier: str) -> str:
    return identifier.split(":", 1)[0]


def paging(request: Request) -> tuple[int, int]:
    q = request.query_params
    return (
        _int_param(q.get("page"), "page", default=1, high=1_000_000),
        _int_param(q.get("page_size"), "page_size", default=MAX_PAGE_SIZE, high=MAX_PAGE_SIZE),
    )


def _int_param(raw: str | None, name: str, *, default: int, high: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"`{name}` must be an integer, got {raw!r}") from None
    if not 1 <= value <= high:
        raise bad_request(f"`{name}` must be between 1 and {high}, got {value}")
    return value


async def _read_body(request: Request, limit: int = MAX_JSON_BODY) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise bad_request(f"the body is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise bad_request(f"the body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, type_: type[T]) -> T:
    """The JSON body as ``type_``; a missing, malformed or ill-typed body is a clear -400."""
    raw = await _read_body(request)
    if not raw.strip():
        raise bad_request("a JSON body is required")
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as exc:
        raise bad_request(f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the body is not JSON: {exc}") from None


def _limited(receive: Any, limit: int, too_big: DifyError) -> Any:
    """``receive`` that refuses a body over ``limit`` plus the multipart overhead."""
    seen = 0

    async def guarded() -> Any:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit + MULTIPART_OVERHEAD:
                raise too_big
        return message

    return guarded


def _time(value: datetime) -> str:
    return rfc3339(value) or ""


# -- errors ---------------------------------------------------------------------------------------

# plugind's error codes, as the Dify error types dify-api knows
_BAD_REQUEST_CODES: Final = frozenset(
    {
        "invalid_package",
        "unsafe_package",
        "package_too_large",
        "signature_invalid",
        "checksum_mismatch",
        "malformed_command",
        "payload_too_large",
    }
)


def from_plugind_error(exc: PlugindError) -> DifyError:
    if exc.code in _BAD_REQUEST_CODES:
        return bad_request(exc.message)
    if exc.code == "unknown_plugin":
        return DifyError(PLUGIN_UNIQUE_IDENTIFIER_ERROR, exc.message)
    if exc.code in ("not_installed", "package_not_found"):
        return plugin_not_found(exc.message)
    return internal_error(exc.message)


def error_response(status: int, err: DifyError) -> Response:
    response = error(err)
    response.status_code = status
    return response


def guarded(handler: Handler) -> Handler:
    """Every failure as a Dify envelope (HTTP 200), never a bare 500."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except DifyError as exc:
            return error(exc)
        except PlugindError as exc:
            return error(from_plugind_error(exc))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            log.error("Dify %s %s: database error %r", request.method, request.url.path, exc)
            return error(internal_error(f"the database did not answer: {exc!r}"))
        except redis.exceptions.RedisError as exc:
            log.error("Dify %s %s: Redis error %r", request.method, request.url.path, exc)
            return error(internal_error(f"Redis did not answer: {exc!r}"))

    return endpoint
