"""Committing a batch: ``event_log``, read models and checkpoint in ONE transaction.

Positions are gap-free and hash chained from the checkpoint's head. Every entry at or below the
checkpoint's stream id is skipped, so committing a batch again (a crash between commit and
acknowledgement, a group reset, a retry after an outage) changes nothing. The checkpoint row is
locked ``FOR UPDATE`` first, so even two projectors that both believed they led could not
interleave positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import asyncpg

from plugind.bus.keys import Keys
from plugind.projections._db import Conn, postgres_unreachable
from plugind.projections._entries import LogEntry, stream_id_key
from plugind.projections.hashchain import chain_hash
from plugind.projections.queries import Checkpoint, get_checkpoint, logged_event_ids
from plugind.projections.read_models import apply_event, apply_events

log = logging.getLogger(__name__)


class ProjectionConflictError(RuntimeError):
    """The database's event log follows another namespace's events stream."""


_INSERT_LOG: Final = """
INSERT INTO event_log (position, stream_id, event_id, type, request_id, tenant_id, plugin_id,
                       at, payload, hash)
SELECT p, s, e, t, r, tn, pl, a, j::jsonb, h
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::timestamptz[], $9::text[], $10::bytea[])
     AS u(p, s, e, t, r, tn, pl, a, j, h)
"""

# jsonb normalises numbers and key order; hashing what Postgres will hand back to a verifier
# keeps the chain verifiable from the table alone.
_NORMALISE: Final = """
SELECT u.j::jsonb::text AS j FROM unnest($1::text[]) WITH ORDINALITY AS u(j, i) ORDER BY u.i
"""

_ADVANCE: Final = """
UPDATE projection_checkpoints
SET stream = $2, last_stream_id = $3, last_position = $4, head_hash = $5, updated_at = now()
WHERE name = $1
"""


async def commit_batch(
    conn: Conn,
    batch: Sequence[LogEntry],
    *,
    keys: Keys,
    checkpoint: str,
    isolate: bool = False,
) -> int:
    """Commit ``batch`` (in stream order) on ``conn``; returns how many events were logged.

    ``isolate`` applies each read-model change on its own savepoint, so one event whose change
    Postgres refuses is logged, skipped and reported instead of failing the batch for ever: the
    caller turns it on for the retry of a batch that failed.
    """
    async with conn.transaction():
        cp = await _lock_checkpoint(conn, checkpoint, keys.events)
        last = stream_id_key(cp.last_stream_id) if cp.last_stream_id else None
        fresh = [e for e in batch if last is None or stream_id_key(e.stream_id) > last]
        if not fresh:
            return 0
        rows = await _drop_duplicates(conn, fresh)
        position, head = cp.last_position, cp.head_hash
        if rows:
            positions, position, head = await _append(conn, rows, position, head)
            await _apply(conn, rows, positions, tasks_stream=keys.tasks, isolate=isolate)
        await conn.execute(_ADVANCE, checkpoint, keys.events, fresh[-1].stream_id, position, head)
    log.debug("Projected %d events up to position %d", len(rows), position)
    return len(rows)


async def _lock_checkpoint(conn: Conn, name: str, stream: str) -> Checkpoint:
    await conn.execute(
        "INSERT INTO projection_checkpoints (name, stream) VALUES ($1, $2)"
        " ON CONFLICT (name) DO NOTHING",
        name,
        stream,
    )
    cp = await get_checkpoint(conn, name, for_update=True)
    assert cp is not None
    if cp.stream is not None and cp.stream != stream:
        raise ProjectionConflictError(
            f"this database's event log follows {cp.stream}, not {stream}: "
            "use one database per namespace"
        )
    return cp


async def _drop_duplicates(conn: Conn, entries: list[LogEntry]) -> list[LogEntry]:
    """Skip events whose ``event_id`` is already logged (an emitter appended one twice)."""
    seen = await logged_event_ids(conn, [e.event_id for e in entries if e.event_id is not None])
    kept: list[LogEntry] = []
    for entry in entries:
        if entry.event_id is not None:
            if entry.event_id in seen:
                log.warning(
                    "Skipping event %s (%s) at stream id %s: already in the event log",
                    entry.event_id,
                    entry.type,
                    entry.stream_id,
                )
                continue
            seen.add(entry.event_id)
        kept.append(entry)
    return kept


async def _append(
    conn: Conn, rows: list[LogEntry], position: int, head: bytes
) -> tuple[list[int], int, bytes]:
    """Insert ``rows`` into ``event_log`` after ``position``; returns their positions and the
    new last position and head hash."""
    normalised: list[str] = [
        r["j"] for r in await conn.fetch(_NORMALISE, [e.payload for e in rows])
    ]
    positions: list[int] = []
    hashes: list[bytes] = []
    for text in normalised:
        position += 1
        head = chain_hash(head, text)
        positions.append(position)
        hashes.append(head)
    await conn.execute(
        _INSERT_LOG,
        positions,
        [e.stream_id for e in rows],
        [e.event_id for e in rows],
        [e.type for e in rows],
        [e.request_id for e in rows],
        [e.tenant_id for e in rows],
        [e.plugin_id for e in rows],
        [e.at for e in rows],
        normalised,
        hashes,
    )
    for entry, pos in zip(rows, positions, strict=True):
        if entry.event is None:
            log.error(
                "Event stream entry %s is not a valid event (%s); recorded as type unknown at "
                "position %d",
                entry.stream_id,
                entry.error,
                pos,
            )
    return positions, position, head


async def _apply(
    conn: Conn, rows: list[LogEntry], positions: list[int], *, tasks_stream: str, isolate: bool
) -> None:
    if not isolate:
        await apply_events(
            conn, [(e.event, e.at) for e in rows if e.event is not None], tasks_stream=tasks_stream
        )
        return
    for entry, position in zip(rows, positions, strict=True):
        if entry.event is None:
            continue
        try:
            async with conn.transaction():
                await apply_event(conn, entry.event, at=entry.at, tasks_stream=tasks_stream)
        except asyncpg.PostgresError as exc:
            if postgres_unreachable(exc):
                raise  # not this event's fault: the whole batch is retried
            log.error(
                "Read-model update skipped for event %s (%s) at position %d: %r",
                entry.event_id,
                entry.type,
                position,
                exc,
            )
