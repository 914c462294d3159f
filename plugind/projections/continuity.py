"""Keeping the events stream after the event log when Redis comes back empty or older.

The event log in Postgres is the record; Redis holds work in flight. After Redis is lost (a new
server, a flush, a snapshot older than the last backup of Postgres), the events stream starts
again, and its entry ids (milliseconds of the Redis clock) must still order after the last one
the log holds: the projector skips every entry at or below its checkpoint, so an id that sorts
lower (a clock behind the old server's) would be dropped from the log. :func:`continue_stream`
moves the stream's last id up to the checkpoint's before anything is appended (``XSETID``), so
every new event sorts after the log. Every node runs it at start, before its roles.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from plugind.bus.codec import text
from plugind.bus.groups import ensure_group
from plugind.bus.keys import PROJECTOR_GROUP, Keys
from plugind.projections._entries import stream_id_key
from plugind.projections.queries import get_checkpoint

log = logging.getLogger(__name__)


async def continue_stream(redis: aioredis.Redis, db: asyncpg.Pool, keys: Keys) -> str | None:
    """Make the events stream's next ids sort after the event log's last; returns the id the
    stream was moved to, or ``None`` when it was already past it (the usual case)."""
    async with db.acquire() as conn:
        checkpoint = await get_checkpoint(conn)
    if checkpoint is None or not checkpoint.last_stream_id:
        return None  # an empty log: any id will do
    logged = checkpoint.last_stream_id
    last = await _last_id(redis, keys)
    if last is not None and stream_id_key(last) >= stream_id_key(logged):
        return None
    await ensure_group(redis, keys.events, PROJECTOR_GROUP)  # creates the stream if missing
    try:
        await redis.execute_command("XSETID", keys.events, logged)  # type: ignore[no-untyped-call]
    except ResponseError as exc:
        if "smaller than" not in str(exc):
            raise
        return None  # another node moved it, and events came after: already past the log
    log.warning(
        "The events stream in Redis was %s the event log (last %s): it continues after %s, so "
        "new events follow the log. Commands in flight when Redis was lost must be sent again.",
        "behind" if last is not None else "missing from",
        last or "-",
        logged,
    )
    return logged


async def _last_id(redis: aioredis.Redis, keys: Keys) -> str | None:
    try:
        info: Any = await redis.xinfo_stream(keys.events)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    value = info.get("last-generated-id") or info.get(b"last-generated-id")
    return text(value) if value is not None else None
