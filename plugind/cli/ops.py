"""Operator commands: dead letters and the audit of the event log."""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

import orjson

from plugind.bus.codec import CMD_FIELD, text
from plugind.bus.keys import Keys
from plugind.cli.support import database, service_urls
from plugind.client import Client
from plugind.config import Settings
from plugind.errors import CliError


async def cmd_dlq(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    redis_url, _ = service_urls(settings)
    keys = Keys(settings.namespace)
    async with Client.from_url(redis_url, settings.namespace) as client:
        entries: Any = await client.redis.xrange(keys.dead)
        chosen = [
            (text(entry_id), {text(k): text(v) for k, v in fields.items()})
            for entry_id, fields in entries
            if args.all or args.action == "list" or text(entry_id) in args.ids
        ]
        if args.action != "list" and not args.all and not args.ids:
            raise CliError(f"dlq {args.action}: name dead-letter ids or give --all", exit_code=2)
        if args.action == "list":
            for entry_id, fields in chosen:
                print(_dead_line(entry_id, fields, as_json=args.json))
            return 0
        done = 0
        for entry_id, fields in chosen:
            if args.action == "retry":
                new_id = await _retry(client, fields)
                print(f"{entry_id} -> {fields.get('stream')} request_id={new_id}")
            await client.redis.xdel(keys.dead, entry_id)
            done += 1
        print(f"{args.action}: {done} dead letter(s)", file=sys.stderr)
        return 0


def _dead_line(entry_id: str, fields: dict[str, str], *, as_json: bool) -> str:
    original = _original(fields)
    if as_json:
        return orjson.dumps({"id": entry_id, **fields}).decode()
    error = orjson.loads(fields.get("error", "{}") or "{}")
    return (
        f"{entry_id}  {fields.get('stream', '?')} {fields.get('entry_id', '?')}  "
        f"deliveries={fields.get('deliveries', '?')}  "
        f"request_id={original.get('request_id', '-') if isinstance(original, dict) else '-'}  "
        f"{error.get('code', '')}: {error.get('message', '')}"
    )


def _original(fields: dict[str, str]) -> Any:
    try:
        entry = orjson.loads(fields.get("fields", "{}"))
        return orjson.loads(entry.get(CMD_FIELD, "null"))
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return None


async def _retry(client: Client, fields: dict[str, str]) -> str:
    """Publish the dead command again under a new request_id.

    Its old request_id already has its terminal event (``command.dead_lettered``); re-using it
    would make the daemon skip the command as a duplicate.
    """
    stream = fields.get("stream", "")
    if stream not in client.keys.command_streams:
        raise CliError(f"dead letter names an unknown stream {stream!r}")
    entry: dict[Any, Any] = orjson.loads(fields.get("fields", "{}"))
    command = _original(fields)
    new_id = "-"
    if isinstance(command, dict):
        old = str(command.get("request_id") or "request")
        new_id = f"{old[:100]}:retry:{uuid.uuid4().hex[:8]}"
        command["request_id"] = new_id
        entry[CMD_FIELD] = orjson.dumps(command).decode()
    await client.redis.xadd(stream, entry)
    return new_id


async def cmd_audit(args: argparse.Namespace) -> int:
    """Check the hash chain, and that a rebuild from the log equals the live read models.

    The two checks answer different questions: the chain says the log was not altered, the
    rebuild says the read models (what the API serves) still follow from that log. Both run
    and both are reported, so one failure does not hide the other.
    """
    from plugind.projections.hashchain import verify_event_log
    from plugind.projections.rebuild import read_models_equal_rebuild

    async with database(args.settings) as conn:
        chain = await verify_event_log(conn)
        diff = await read_models_equal_rebuild(conn)
    ok = chain.ok and diff.ok
    report = {
        "ok": ok,
        "hash_chain": chain.to_dict(),
        "read_models": diff.to_dict(),
    }
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    if not chain.ok:
        print(
            f"plugind: the event log is broken at position {chain.bad_position}: {chain.reason}",
            file=sys.stderr,
        )
    if not diff.ok:
        entries = (*diff.plugins, *diff.tasks, *diff.endpoints)
        shown = [" ".join((e.table, *e.key)) for e in entries][:10]
        print(
            f"plugind: the read models differ from a rebuild of the event log: "
            f"{diff.plugins_differing} plugin row(s), {diff.tasks_differing} task row(s), "
            f"{diff.endpoints_differing} endpoint row(s) "
            f"(e.g. {', '.join(shown)}); `plugind projections rebuild` recomputes them",
            file=sys.stderr,
        )
    return 0 if ok else 1
