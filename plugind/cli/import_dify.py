"""``plugind import-dify``: install for each tenant what Dify's own plugin daemon had installed.

When plugind takes the place of Dify's daemon, the tenants' plugins are still listed in the
upstream daemon's tables (``public.plugin_installations`` of ``dify_plugin``) and their packages
sit in its storage (``$PLUGIN_STORAGE_LOCAL_ROOT/plugin_packages/<identifier>``). This command
reads both, puts each package in plugind's package store, remembers where Dify said each install
came from (``source``, ``meta``), and publishes one install command per (tenant, plugin): the
event log records the import like any install. Request ids are derived from tenant and
identifier, so running it twice installs nothing twice. Nothing of the upstream daemon is
changed, so switching back keeps working.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg
import orjson

from plugind.cli.support import database, failed, required_database_url, service_urls
from plugind.client import Client
from plugind.config import Settings
from plugind.errors import CliError, PlugindError, WaitTimeout
from plugind.messages import InstallCommand, PackageRef, encode
from plugind.package.difypkg import parse_identifier, read_package
from plugind.projections.migrate import migrate
from plugind.projections.package_store import store_package

# the upstream daemon's default storage layout (its PLUGIN_STORAGE_LOCAL_ROOT and
# PLUGIN_PACKAGE_CACHE_PATH; installed copies under PLUGIN_INSTALLED_PATH)
DEFAULT_STORAGE: Final = "/app/storage"
PACKAGE_FOLDERS: Final = ("plugin_packages", "plugin")
_REQUEST_NS: Final = uuid.UUID("6f1f4f0e-2d7c-4b9a-8b53-3c0b1d6a9e47")


@dataclass(frozen=True, slots=True)
class UpstreamInstallation:
    tenant_id: str
    plugin_id: str
    identifier: str
    runtime_type: str
    source: str
    meta: dict[str, Any]


def request_id(tenant_id: str, identifier: str) -> str:
    key = tenant_id + "\x1f" + identifier
    return f"import-dify:{uuid.uuid5(_REQUEST_NS, key)}"


async def read_upstream(conn: asyncpg.Connection, tenants: list[str]) -> list[UpstreamInstallation]:
    if not await conn.fetchval("SELECT to_regclass('public.plugin_installations') IS NOT NULL"):
        raise CliError(
            "no table public.plugin_installations in that database: it is not the database of "
            "Dify's plugin daemon (dify_plugin); give it with --database-url"
        )
    rows = await conn.fetch(
        """
        SELECT tenant_id::text AS tenant_id, plugin_id, plugin_unique_identifier,
               coalesce(runtime_type, 'local') AS runtime_type,
               coalesce(source, 'package') AS source, meta::text AS meta
        FROM public.plugin_installations ORDER BY created_at, plugin_id
        """
    )
    found = []
    for row in rows:
        if tenants and row["tenant_id"] not in tenants:
            continue
        try:
            meta = orjson.loads(row["meta"]) if row["meta"] else {}
        except orjson.JSONDecodeError:
            meta = {}
        found.append(
            UpstreamInstallation(
                tenant_id=row["tenant_id"],
                plugin_id=row["plugin_id"],
                identifier=row["plugin_unique_identifier"],
                runtime_type=row["runtime_type"],
                source=row["source"] or "package",
                meta=meta if isinstance(meta, dict) else {},
            )
        )
    return found


def find_package(storage: Path, identifier: str) -> Path | None:
    for folder in PACKAGE_FOLDERS:
        path = storage / folder / identifier
        if path.is_file():
            return path
    return None


async def cmd_import_dify(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    redis_url, _ = service_urls(settings)
    plugind_url = required_database_url(settings)
    storage = Path(args.storage or os.environ.get("PLUGIN_STORAGE_LOCAL_ROOT") or DEFAULT_STORAGE)
    # Dify's daemon's tables are read schema-qualified (public.…), whatever the search path
    upstream_url = args.database_url or plugind_url
    async with database(settings, url=upstream_url, what="the upstream daemon's database") as up:
        installations = await read_upstream(up, args.tenant)
    skipped = [i for i in installations if i.runtime_type != "local"]
    installations = [i for i in installations if i.runtime_type == "local"]
    for item in skipped:
        _line(item, f"skipped: a {item.runtime_type} plugin (run it against plugind again)")
    if not installations:
        print("nothing to import", file=sys.stderr)
        return 0

    commands: list[tuple[UpstreamInstallation, InstallCommand]] = []
    missing = 0
    async with database(settings) as conn:
        await migrate(conn, schema=settings.db_schema)
        stored: dict[str, str | None] = {}
        for item in installations:
            if item.identifier not in stored:
                stored[item.identifier] = await _store(conn, storage, item.identifier, settings)
            sha256 = stored[item.identifier]
            if sha256 is None:
                missing += 1
                _line(item, f"skipped: no package under {storage}/{{{','.join(PACKAGE_FOLDERS)}}}")
                continue
            commands.append(
                (
                    item,
                    InstallCommand(
                        request_id=request_id(item.tenant_id, item.identifier),
                        tenant_id=item.tenant_id,
                        package=PackageRef(sha256=sha256),
                        expected_identifier=item.identifier,
                    ),
                )
            )
        if args.dry_run:
            for item, command in commands:
                _line(item, f"would install ({command.request_id})")
            return 1 if missing else 0
        await conn.executemany(
            """
            INSERT INTO dify_install_sources (tenant_id, identifier, source, meta)
            VALUES ($1, $2, $3, $4::text::jsonb)
            ON CONFLICT (tenant_id, identifier) DO UPDATE SET
                source = EXCLUDED.source, meta = EXCLUDED.meta, updated_at = now()
            """,
            [
                (i.tenant_id, i.identifier, i.source, orjson.dumps(i.meta).decode())
                for i, _ in commands
            ],
        )

    failures = missing
    async with Client.from_url(redis_url, settings.namespace) as client:
        await client.send_many([command for _, command in commands])
        for item, command in commands:
            if not args.wait:
                _line(item, f"queued ({command.request_id})")
                continue
            try:
                event = await client.wait(command.request_id, timeout=args.timeout)
            except WaitTimeout:
                failures += 1
                _line(item, f"still installing after {args.timeout:g}s ({command.request_id})")
                continue
            if failed(event):
                failures += 1
                error = orjson.loads(encode(event)).get("error") or {}
                _line(item, f"failed: {error.get('code')}: {error.get('message')}")
            else:
                _line(item, "installed")
    return 1 if failures else 0


async def _store(
    conn: asyncpg.Connection, storage: Path, identifier: str, settings: Settings
) -> str | None:
    """Put the package of ``identifier`` in plugind's store; its sha256, or None if not found."""
    try:
        parse_identifier(identifier)
    except PlugindError:
        return None
    path = find_package(storage, identifier)
    if path is None:
        return None
    data = await anyio.Path(path).read_bytes()
    try:
        package = await anyio.to_thread.run_sync(
            lambda: read_package(data, max_size=settings.max_package_size)
        )
    except PlugindError as exc:
        print(f"{identifier}: {path} is not a usable package: {exc.message}", file=sys.stderr)
        return None
    if package.identifier != identifier:
        print(f"{identifier}: {path} holds {package.identifier} instead", file=sys.stderr)
        return None
    await store_package(conn, package)
    return package.sha256


def _line(item: UpstreamInstallation, outcome: str) -> None:
    print(f"{item.tenant_id} {item.identifier}: {outcome}", flush=True)
