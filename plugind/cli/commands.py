"""The bodies of the ``plugind`` sub-commands (the parser is in ``cli``)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import anyio
import asyncpg
import orjson

from plugind.bus.codec import EVENT_FIELD, text
from plugind.bus.keys import PROJECTOR_GROUP, WORKERS_GROUP, Keys
from plugind.cli.support import (
    CliError,
    failed,
    parse_params,
    print_event,
    service_urls,
)
from plugind.client import Client, WaitTimeout
from plugind.config import Settings
from plugind.logs import setup_logging
from plugind.messages import (
    AnyEvent,
    InstallProgress,
    InstallStarted,
    PackageRef,
    TaskStarted,
    decode_event,
    encode,
)
from plugind.projections._db import connect

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
    _redis_url, database_url = service_urls(settings)
    if database_url is None:
        raise CliError("DATABASE_URL is not set and no embedded daemon is running here")
    conn = await connect(database_url, schema=settings.db_schema)
    try:
        applied = await migrate(conn, schema=settings.db_schema)
    finally:
        await conn.close()
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
        print(f"  {event.__struct_config__.tag}", file=sys.stderr, flush=True)


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
    _redis_url, database_url = service_urls(settings)
    if len(data) > INLINE_PACKAGE_LIMIT and database_url is not None:
        package = await _through_the_store(data, database_url, settings)
    async with _client(settings) as client:
        rid = await client.install(package, tenant_id=args.tenant, request_id=args.request_id)
        return await _finish(client, rid, args)


async def _through_the_store(data: bytes, database_url: str, settings: Settings) -> PackageRef:
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
    conn = await connect(database_url, schema=settings.db_schema)
    try:
        await store_package(conn, package)
    finally:
        await conn.close()
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
    _redis_url, database_url = service_urls(settings)
    if database_url is None:
        raise CliError("DATABASE_URL is not set and no embedded daemon is running here")
    conn = await connect(database_url, schema=settings.db_schema)
    try:
        rows = await _event_rows(conn, args)
    finally:
        await conn.close()
    for row in rows:
        payload = row["payload"]
        if args.json:
            print(payload if isinstance(payload, str) else orjson.dumps(payload).decode())
        else:
            event = orjson.loads(payload) if isinstance(payload, str) else payload
            print(_event_line(int(row["position"]), event))
    return 0


async def _event_rows(conn: asyncpg.Connection, args: argparse.Namespace) -> list[Any]:
    where, params = ["TRUE"], []
    for column, value in (
        ("type", args.type_),
        ("plugin_id", args.plugin),
        ("request_id", args.request),
    ):
        if value:
            params.append(value)
            where.append(f"{column} = ${len(params)}")
    if args.since:
        if args.since.isdigit():
            params.append(int(args.since))
            where.append(f"position >= ${len(params)}")
        else:
            from datetime import datetime

            try:
                params.append(datetime.fromisoformat(args.since.replace("Z", "+00:00")))
            except ValueError:
                raise CliError(
                    f"--since {args.since!r} is neither a position nor RFC 3339", 2
                ) from None
            where.append(f"at >= ${len(params)}")
    params.append(max(1, min(args.limit, 100_000)))
    sql = (
        "SELECT position, payload FROM event_log WHERE "
        + " AND ".join(where)
        + f" ORDER BY position LIMIT ${len(params)}"
    )
    return list(await conn.fetch(sql, *params))


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
        cursor = "$"
        while True:
            reply: Any = await client.redis.xread(
                {client.keys.events: cursor}, count=500, block=5000
            )
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    cursor = text(entry_id)
                    raw = fields.get(EVENT_FIELD.encode())
                    if raw is None:
                        continue
                    event = decode_event(raw)
                    if args.type_ and event.__struct_config__.tag != args.type_:
                        continue
                    if args.request and event.request_id != args.request:
                        continue
                    if args.plugin and getattr(event, "plugin_id", None) != args.plugin:
                        continue
                    if args.json:
                        print(encode(event).decode(), flush=True)
                    else:
                        print(_event_line(cursor, orjson.loads(encode(event))), flush=True)


async def cmd_status(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    logging.getLogger().setLevel(logging.WARNING)
    keys = Keys(settings.namespace)
    redis_url, database_url = service_urls(settings)
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
    if database_url is not None:
        conn = await connect(database_url, schema=settings.db_schema)
        try:
            rows = await conn.fetch("SELECT * FROM projection_checkpoints ORDER BY name")
            report["projections"] = {
                row["name"]: {
                    "last_stream_id": row["last_stream_id"],
                    "last_position": row["last_position"],
                }
                for row in rows
            }
        except asyncpg.UndefinedTableError:
            report["projections"] = "not migrated"
        finally:
            await conn.close()
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


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
