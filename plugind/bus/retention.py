"""Keeping streams from growing forever, without ever dropping unfinished work.

A stream is trimmed with ``XTRIM … MINID`` (never a blind ``MAXLEN``) to the lowest of: what each
of its groups still needs (its oldest pending entry, else the entry after the last one it was
given), the retention window (entries younger than ``retention_s`` stay, so a late ``wait`` or
an operator still finds them), and for the events stream the projector's committed position in
Postgres. The dead-letter stream is left to operators.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from plugind.bus.codec import text
from plugind.bus.keys import Keys
from plugind.outage import Outages, is_postgres_outage, is_redis_outage
from plugind.projections.queries import EVENT_LOG_CHECKPOINT, get_checkpoint

log = logging.getLogger(__name__)


def _parse(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _after(entry_id: str) -> str:
    ms, seq = _parse(entry_id)
    return f"{ms}-{seq + 1}"


def _lowest(*ids: str | None) -> str | None:
    present = [i for i in ids if i is not None]
    return min(present, key=_parse) if present else None


async def group_floor(redis: aioredis.Redis, stream: str) -> str | None:
    """The lowest id any group of ``stream`` may still need; None if the stream has no group."""
    try:
        groups: list[dict[str, Any]] = await redis.xinfo_groups(stream)
    except ResponseError:
        return None  # no such stream
    if not groups:
        return None
    floors: list[str | None] = []
    for group in groups:
        name = text(group["name"])
        summary: Any = await redis.xpending(stream, name)
        if summary["pending"]:
            floors.append(text(summary["min"]))
        else:
            floors.append(_after(text(group["last-delivered-id"])))
    return _lowest(*floors)


async def trim_stream(
    redis: aioredis.Redis, stream: str, *, retention_s: float, ceiling: str | None = None
) -> int:
    """Trim ``stream`` as far as is safe (see the module docstring); returns entries removed."""
    floor = await group_floor(redis, stream)
    if floor is None:
        return 0
    # No window at all for a retention of 0: "now" on this host's clock could fall in the very
    # millisecond (or, with clock skew, before) the last acknowledged entries were given.
    window = f"{int((time.time() - retention_s) * 1000)}-0" if retention_s > 0 else None
    point = _lowest(floor, window, ceiling)
    assert point is not None
    removed: int = await redis.xtrim(stream, minid=point, approximate=False)
    return removed


async def events_ceiling(db: asyncpg.Pool) -> str | None:
    """The entry after the last event the projector committed: nothing at or above it may go."""
    checkpoint = await get_checkpoint(db, EVENT_LOG_CHECKPOINT)
    if checkpoint is None or not checkpoint.last_stream_id:
        return "0-1"  # nothing projected yet: keep everything
    return _after(checkpoint.last_stream_id)


async def run_retention(
    redis: aioredis.Redis,
    db: asyncpg.Pool,
    keys: Keys,
    *,
    retention_s: float,
    every_s: float = 60,
    outages: Outages | None = None,
) -> None:
    """Trim the command and events streams every ``every_s`` seconds, forever.

    A round that meets an outage is skipped (trimming can always wait): the outage is reported
    to ``outages``, which logs it once, and the next round comes sooner than usual.
    """
    outages = outages or Outages()
    while True:
        delay = every_s
        try:
            removed = 0
            for stream in keys.command_streams:
                removed += await trim_stream(redis, stream, retention_s=retention_s)
            ceiling = await events_ceiling(db)
            outages.postgres.ok()
            removed += await trim_stream(
                redis, keys.events, retention_s=retention_s, ceiling=ceiling
            )
            outages.redis.ok()
            if removed:
                log.info("Trimmed %d stream entries older than %.0fs", removed, retention_s)
        except Exception as exc:
            if is_redis_outage(exc):
                outages.redis.failed(exc)
            elif is_postgres_outage(exc):
                outages.postgres.failed(exc)
            elif isinstance(exc, RedisError | asyncpg.PostgresError):
                log.warning("Stream retention skipped a round: %r", exc)
            else:
                raise
            delay = min(every_s, 5.0)
        await anyio.sleep(delay)
