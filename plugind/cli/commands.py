"""The bodies of the ``plugind`` sub-commands (the parser is in ``plugind/cli/main.py``)."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from typing import Any

import anyio
import asyncpg
import msgspec
import orjson

from plugind.bus.codec import text
from plugind.bus.follow import EventFollower
from plugind.bus.keys import PROJECTOR_GROUP, WORKERS_GROUP, Keys
from plugind.bus.nodes import read_reports
from plugind.cli.support import (
    database,
    database_url,
    failed,
    parse_params,
    print_event,
    service_urls,
)
from plugind.client import Client
from plugind.config import Settings
from plugind.errors import CliError, WaitTimeout
from plugind.logs import setup_logging
from plugind.messages import (
    AnyEvent,
    InstallProgress,
    InstallStarted,
    PackageRef,
    TaskStarted,
    event_type,
)

# Packages larger than this go through the package store (when the CLI can reach Postgres).
INLINE_PACKAGE_LIMIT = 1024 * 1024


async def cmd_serve(args: argparse.Namespace) -> int:
    from plugind.daemon import Daemon

    settings: Settings = args.settings
    setup_logging(settings.log_level, settings.log_format)
    roles = tuple(r.strip() for r in args.role.split(",") if r.strip())
    await Daemon(settings, roles=roles).run()
    return 0


async def cmd_migrate(args: argparse.Namespace) -> int:
    from plugind.projections.migrate import migrate

    settings: Settings = args.settings
    setup_logging(settings.log_level, settings.log_format)
    async with database(settings) as conn:
        applied = await migrate(conn, schema=settings.db_schema)
    print(f"applied: {', '.join(applied)}" if applied else "database is up to date")
    return 0


async def cmd_package(args: argparse.Namespace) -> int:
    from plugind.errors import PlugindError
    from plugind.package.difypkg import build_package, read_package

    settings: Settings = args.settings
    if not (args.dir / "manifest.yaml").is_file():
        raise CliError(f"{args.dir} has no manifest.yaml", exit_code=2)
    try:
        data = await anyio.to_thread.run_sync(build_package, args.dir)
        package = read_package(data, max_size=settings.max_package_size)
    except PlugindError as exc:
        raise CliError(f"{exc.code}: {exc.message}") from exc
    if args.sign is not None:
        from plugind.package.signature import sign_package

        try:
            key = await anyio.Path(args.sign).read_bytes()
            data = sign_package(data, key)
        except (OSError, ValueError) as exc:
            raise CliError(f"--sign {args.sign}: {exc}", exit_code=2) from exc
    output = args.output or args.dir.parent / f"{package.name}-{package.version}.difypkg"
    await anyio.Path(output).write_bytes(data)
    print(package.identifier)
    print(f"wrote {output} ({len(data)} bytes)", file=sys.stderr)
    return 0


async def _finish(client: Client, request_id: str, args: argparse.Namespace) -> int:
    if not args.wait:
        print(request_id)
        return 0
    try:
        event = await client.wait(request_id, timeout=args.timeout, on_event=_show_progress)
    except WaitTimeout as exc:
        raise CliError(
            f"{exc}; it may still finish (see `plugind events --request {request_id}`)"
        ) from None
    print_event(event, as_json=getattr(args, "json", False))
    return 1 if failed(event) else 0


def _show_progress(event: AnyEvent) -> None:
    """Long work shows where it is on a terminal, and stays quiet when piped."""
    if not sys.stderr.isatty():
        return
    if isinstance(event, InstallProgress):
        print(f"  {event.step}: {event.message}", file=sys.stderr, flush=True)
    elif isinstance(event, InstallStarted | TaskStarted):
        print(f"  {event_type(event)}", file=sys.stderr, flush=True)


def _client(settings: Settings) -> Client:
    redis_url, _ = service_urls(settings)
    return Client.from_url(redis_url, settings.namespace)


async def cmd_install(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    path = anyio.Path(args.file)
    if not await path.is_file():
        raise CliError(f"no such file: {args.file}", exit_code=2)
    data = await path.read_bytes()
    package: bytes | PackageRef = data
    if len(data) > INLINE_PACKAGE_LIMIT and database_url(settings) is not None:
        package = await _through_the_store(data, settings)
    async with _client(settings) as client:
        rid = await client.install(package, tenant_id=args.tenant, request_id=args.request_id)
        return await _finish(client, rid, args)


async def _through_the_store(data: bytes, settings: Settings) -> PackageRef:
    """Put a large package in the package store so the command carries only its sha256.

    Inline, a 50 MiB package would sit base64-encoded in the install stream until trimmed.
    """
    from plugind.errors import PlugindError
    from plugind.package.difypkg import read_package
    from plugind.projections.package_store import store_package

    try:
        package = await anyio.to_thread.run_sync(
            lambda: read_package(data, max_size=settings.max_package_size)
        )
    except PlugindError as exc:
        raise CliError(f"{exc.code}: {exc.message}") from exc
    async with database(settings) as conn:
        await store_package(conn, package)
    return PackageRef(sha256=package.sha256)


async def cmd_uninstall(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    async with _client(settings) as client:
        rid = await client.uninstall(
            args.plugin_id, tenant_id=args.tenant, request_id=args.request_id
        )
        return await _finish(client, rid, args)


async def cmd_invoke(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    params = parse_params(args.params)
    credentials = parse_params(args.credential, "credential")
    async with _client(settings) as client:
        rid = await client.invoke_tool(
            args.plugin_id,
            args.provider,
            args.tool,
            params,
            credentials=credentials,
            tenant_id=args.tenant,
            user_id=args.user,
            timeout_s=args.task_timeout,
            request_id=args.request_id,
        )
        return await _finish(client, rid, args)


async def cmd_events(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    if args.follow:
        return await _follow(settings, args)
    from plugind.projections.queries import MAX_EVENTS_LIMIT, query_events

    since = _since(args.since)
    async with database(settings) as conn:
        wanted, after = max(1, min(args.limit, 100_000)), None
        while wanted > 0:
            page = await query_events(
                conn,
                types=[args.type_] if args.type_ else None,
                plugin_id=args.plugin or None,
                request_id=args.request or None,
                since=since,
                after=after,
                limit=min(wanted, MAX_EVENTS_LIMIT),
            )
            for row in page.events:
                if args.json:
                    print(orjson.dumps(row.event).decode())
                else:
                    print(_event_line(row.position, row.event))
            wanted -= len(page.events)
            if page.next is None:
                break
            after = page.next
    return 0


def _since(raw: str | None) -> datetime | int | None:
    """``--since``: a log position, or an RFC 3339 time."""
    if not raw:
        return None
    if raw.isdigit():
        return int(raw)
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"--since {raw!r} is neither a position nor RFC 3339", 2) from None


def _short(plugin_id: str | None) -> str | None:
    from plugind.projections.read_models import short_plugin_id

    return short_plugin_id(plugin_id) if plugin_id else None


def _event_line(position: int | str, event: dict[str, Any]) -> str:
    skip = {"type", "v", "event_id", "request_id", "tenant_id", "at", "node"}
    rest = {k: v for k, v in event.items() if k not in skip}
    detail = orjson.dumps(rest).decode()
    if len(detail) > 200:
        detail = detail[:197] + "..."
    return (
        f"{position}  {event.get('at', '')}  {event.get('type', ''):<24} "
        f"request_id={event.get('request_id', '')} {detail}"
    )


async def _follow(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as client:
        follower = EventFollower(client.redis, client.keys, request_id=args.request, block_ms=5000)
        async for followed in follower:
            if followed is None:
                continue
            event = followed.event
            if args.type_ and event_type(event) != args.type_:
                continue
            if args.plugin and _short(getattr(event, "plugin_id", None)) != _short(args.plugin):
                continue  # as the log query does: author/name matches each of its versions
            if args.json:
                print(followed.raw.decode(), flush=True)
            else:
                print(_event_line(followed.entry_id, orjson.loads(followed.raw)), flush=True)
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    logging.getLogger().setLevel(logging.WARNING)
    keys = Keys(settings.namespace)
    redis_url, _ = service_urls(settings)
    async with Client.from_url(redis_url, settings.namespace) as client:
        r = client.redis
        report: dict[str, Any] = {"namespace": settings.namespace, "streams": {}}
        for stream, group in (
            (keys.install, WORKERS_GROUP),
            (keys.tasks, WORKERS_GROUP),
            (keys.events, PROJECTOR_GROUP),
            (keys.dead, None),
        ):
            report["streams"][stream] = await _stream_status(r, stream, group)
        # the plugin pools live in the daemons' memory; each worker publishes its own
        report["nodes"] = {
            node.node: {
                "at": node.at,
                "version": node.version,
                "plugins": msgspec.to_builtins(node.pool),
            }
            for node in await read_reports(r, keys)
        }
    if database_url(settings) is not None:
        report["projections"] = await _projections_status(settings)
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


async def _projections_status(settings: Settings) -> dict[str, Any] | str:
    """The projector's checkpoints, or why there are none to show (status reports, not fails)."""
    from plugind.projections.queries import list_checkpoints

    try:
        async with database(settings) as conn:
            try:
                return {
                    cp.name: {
                        "last_stream_id": cp.last_stream_id,
                        "last_position": cp.last_position,
                    }
                    for cp in await list_checkpoints(conn)
                }
            except asyncpg.UndefinedTableError:
                return "not migrated"
    except CliError as exc:
        return f"unavailable: {exc}"


async def _stream_status(r: Any, stream: str, group: str | None) -> dict[str, Any]:
    length = await r.xlen(stream)
    out: dict[str, Any] = {"length": length}
    if group is None:
        return out
    groups = await r.xinfo_groups(stream) if length or await r.exists(stream) else []
    for info in groups:
        if text(info["name"]) != group:
            continue
        out["group"] = group
        out["pending"] = info["pending"]
        out["lag"] = info.get("lag")
        consumers = await r.xinfo_consumers(stream, group)
        out["consumers"] = [
            {"name": text(c["name"]), "pending": c["pending"], "idle_ms": c["idle"]}
            for c in consumers
        ]
    return out
