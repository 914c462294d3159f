"""What the commands share: finding the daemon's services, the one way to connect to Postgres,
printing results."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson

from plugind.config import Settings, mask_url
from plugind.errors import CliError
from plugind.messages import AnyEvent, TaskFailed, TaskSucceeded, TaskTimedOut, encode
from plugind.projections._db import connect


def service_urls(settings: Settings) -> tuple[str, str | None]:
    """``(redis_url, database_url)``: from the environment, else the running embedded daemon's."""
    redis_url, database_url = _urls(settings)
    if redis_url is None:
        raise CliError(
            "REDIS_URL is not set and no embedded daemon is running here "
            f"(no {settings.embedded_dir}/runtime.json); start one with `plugind serve`"
        )
    return redis_url, database_url


def database_url(settings: Settings) -> str | None:
    """DATABASE_URL, else the running embedded daemon's Postgres; None if neither (a command
    that only reads Postgres needs no Redis)."""
    return _urls(settings)[1]


def required_database_url(settings: Settings) -> str:
    """:func:`database_url`, or a :class:`CliError` saying how to get one."""
    url = database_url(settings)
    if url is None:
        raise CliError(
            "DATABASE_URL is not set and no embedded daemon is running here "
            f"(no {settings.embedded_dir}/runtime.json); start one with `plugind serve`"
        )
    return url


def _urls(settings: Settings) -> tuple[str | None, str | None]:
    redis_url, db_url = settings.redis_url, settings.database_url
    if redis_url is None or db_url is None:
        from plugind.embedded import read_runtime_file

        found = read_runtime_file(settings.embedded_dir)
        if found is not None:
            redis_url = redis_url or found.redis_url
            db_url = db_url or found.database_url
    return redis_url, db_url


@asynccontextmanager
async def database(
    settings: Settings, *, url: str | None = None, what: str = "Postgres"
) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the daemon's database, in plugind's schema, for the block: how every
    command that needs Postgres gets one.

    The URL is :func:`database_url`'s unless ``url`` names another database (``what`` names it
    in messages: import-dify reads Dify's daemon's). The failures an operator meets become one
    clear :class:`CliError`: no database configured, Postgres unreachable or refusing the
    connection, and a database that has not been migrated (a query in the block finds no table).
    """
    if url is None:
        url = required_database_url(settings)
    try:
        conn = await connect(url, schema=settings.db_schema, timeout=settings.connect_timeout)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CliError(f"cannot connect to {what} at {mask_url(url)}: {exc}") from None
    try:
        yield conn
    except asyncpg.UndefinedTableError as exc:
        raise CliError(f"the database is not migrated ({exc}); run `plugind migrate`") from None
    finally:
        await conn.close()


def parse_params(items: list[str], what: str = "parameter") -> dict[str, Any]:
    """``key=value`` pairs; a value is JSON when it parses as JSON (``2``, ``true``), else text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{what} {item!r} is not key=value", exit_code=2)
        try:
            out[key] = orjson.loads(value)
        except orjson.JSONDecodeError:
            out[key] = value
    return out


def print_event(event: AnyEvent, *, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(encode(event).decode() + "\n")
        return
    if isinstance(event, TaskSucceeded):
        for chunk in event.result.chunks:
            sys.stdout.write(render_chunk(chunk) + "\n")
        return
    summary = orjson.dumps(
        {k: v for k, v in orjson.loads(encode(event)).items() if k not in ("v", "node", "event_id")}
    ).decode()
    sys.stdout.write(summary + "\n")


def render_chunk(chunk: Any) -> str:
    """A tool message as a person wants to read it: text as text, JSON as JSON."""
    if isinstance(chunk, dict):
        kind, message = chunk.get("type"), chunk.get("message")
        if isinstance(message, dict):
            if kind in ("text", "link", "image") and isinstance(message.get("text"), str):
                return str(message["text"])
            if kind == "json" and "json_object" in message:
                return orjson.dumps(message["json_object"]).decode()
    return orjson.dumps(chunk).decode()


def failed(event: AnyEvent) -> bool:
    return isinstance(event, TaskFailed | TaskTimedOut) or event.__struct_config__.tag in (
        "plugin.install_failed",
        "command.rejected",
        "command.dead_lettered",
    )
