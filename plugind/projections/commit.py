"""Committing a batch: ``event_log``, read models and checkpoint in ONE transaction.

Positions are gap-free and hash chained from the checkpoint's head. Every entry at or below the
checkpoint's stream id is skipped, so committing a batch again (a crash between commit and
acknowledgement, a group reset, a retry after an outage) changes nothing. The checkpoint row is
locked ``FOR UPDATE`` first, so even two projectors that both believed they led could not
interleave positions.

A batch costs a handful of round trips, whatever its size, and reads no row it does not write:
lock the checkpoint; insert the log rows and advance the checkpoint in one statement; one
set-based statement per kind of read-model change (``read_models.apply_events``); commit.
Events already logged (an emitter that appended one twice) are found by the insert itself
(``ON CONFLICT (event_id) DO NOTHING``), not by a lookup first: in the rare batch that has one,
the rows just inserted are deleted again and the rest logged without it. Payloads are
normalised by Postgres only when jsonb would change their canonical form
(``_entries.jsonb_canonical``); plugind's own events hash without that round trip.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

import asyncpg

from plugind.bus.keys import Keys
from plugind.projections._db import Conn, postgres_unreachable
from plugind.projections._entries import LogEntry, stream_id_key
from plugind.projections.hashchain import canonical, chain_hash_canonical
from plugind.projections.queries import Checkpoint, get_checkpoint
from plugind.projections.read_models import apply_event, apply_events

log = logging.getLogger(__name__)


class ProjectionConflictError(RuntimeError):
    """The database's event log follows another namespace's events stream."""


_COLUMNS: Final = """
position, stream_id, event_id, type, request_id, tenant_id, plugin_id, at, payload, hash
"""

_ROWS: Final = """
SELECT p, s, e, t, r, tn, pl, a, j::jsonb, h
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::timestamptz[], $9::text[], $10::bytea[])
     AS u(p, s, e, t, r, tn, pl, a, j, h)
"""

# The log rows and the checkpoint in one statement; an event whose event_id is logged already
# is left out, and the caller sees it missing from what the statement returns.
_INSERT_LOG_AND_ADVANCE: Final = f"""
WITH advance AS (
    UPDATE projection_checkpoints
    SET stream = $12, last_stream_id = $13, last_position = $14, head_hash = $15,
        updated_at = now()
    WHERE name = $11
)
INSERT INTO event_log ({_COLUMNS}) {_ROWS}
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

_INSERT_LOG: Final = f"INSERT INTO event_log ({_COLUMNS}) {_ROWS}"

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
        rows, positions, position = await _append(conn, fresh, cp, checkpoint, keys.events)
        if rows:
            await _apply(conn, rows, positions, tasks_stream=keys.tasks, isolate=isolate)
    log.debug("Projected %d events up to position %d", len(rows), position)
    return len(rows)


async def _lock_checkpoint(conn: Conn, name: str, stream: str) -> Checkpoint:
    cp = await get_checkpoint(conn, name, for_update=True)
    if cp is None:
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


async def _canonical_forms(conn: Conn, rows: Sequence[LogEntry]) -> list[bytes]:
    """What each row's hash covers: the canonical bytes of the text Postgres will hand back."""
    forms = [e.canonical if e.canonical is not None else b"" for e in rows]
    slow = [i for i, e in enumerate(rows) if e.canonical is None]
    if slow:
        normalised = await conn.fetch(_NORMALISE, [rows[i].payload for i in slow])
        for i, record in zip(slow, normalised, strict=True):
            forms[i] = canonical(record["j"])
    return forms


def _chain(forms: Sequence[bytes], position: int, head: bytes) -> tuple[list[int], list[bytes]]:
    positions: list[int] = []
    hashes: list[bytes] = []
    for form in forms:
        position += 1
        head = chain_hash_canonical(head, form)
        positions.append(position)
        hashes.append(head)
    return positions, hashes


def _arguments(rows: Sequence[LogEntry], positions: list[int], hashes: list[bytes]) -> list[Any]:
    return [
        positions,
        [e.stream_id for e in rows],
        [e.event_id for e in rows],
        [e.type for e in rows],
        [e.request_id for e in rows],
        [e.tenant_id for e in rows],
        [e.plugin_id for e in rows],
        [e.at for e in rows],
        [e.payload for e in rows],
        hashes,
    ]


async def _append(
    conn: Conn, fresh: list[LogEntry], cp: Checkpoint, checkpoint: str, stream: str
) -> tuple[list[LogEntry], list[int], int]:
    """Log ``fresh`` after the checkpoint and advance it; returns the rows logged (duplicates
    of logged events left out), their positions and the new last position."""
    forms = await _canonical_forms(conn, fresh)
    positions, hashes = _chain(forms, cp.last_position, cp.head_hash)
    inserted = await conn.fetch(
        _INSERT_LOG_AND_ADVANCE,
        *_arguments(fresh, positions, hashes),
        checkpoint,
        stream,
        fresh[-1].stream_id,
        positions[-1],
        hashes[-1],
    )
    expected = sum(1 for e in fresh if e.event_id is not None)
    if sum(1 for r in inserted if r["event_id"] is not None) == expected:
        rows = fresh
    else:
        # Some event was logged before, or twice in this batch: keep each event's first entry
        # unless the log had it already, and log the batch again without the others.
        rows, forms, positions, hashes = await _without_duplicates(
            conn, fresh, forms, inserted, cp, checkpoint, stream
        )
    _report_unknown(rows, positions)
    return rows, positions, positions[-1] if positions else cp.last_position


async def _without_duplicates(
    conn: Conn,
    fresh: list[LogEntry],
    forms: list[bytes],
    inserted: Sequence[Any],
    cp: Checkpoint,
    checkpoint: str,
    stream: str,
) -> tuple[list[LogEntry], list[bytes], list[int], list[bytes]]:
    new_ids = {r["event_id"] for r in inserted}
    seen: set[str] = set()
    rows: list[LogEntry] = []
    kept_forms: list[bytes] = []
    for entry, form in zip(fresh, forms, strict=True):
        if entry.event_id is not None:
            if entry.event_id not in new_ids or entry.event_id in seen:
                log.warning(
                    "Skipping event %s (%s) at stream id %s: already in the event log",
                    entry.event_id,
                    entry.type,
                    entry.stream_id,
                )
                continue
            seen.add(entry.event_id)
        rows.append(entry)
        kept_forms.append(form)
    await conn.execute(
        "DELETE FROM event_log WHERE position BETWEEN $1 AND $2",
        cp.last_position + 1,
        cp.last_position + len(fresh),
    )
    positions, hashes = _chain(kept_forms, cp.last_position, cp.head_hash)
    if rows:
        await conn.execute(_INSERT_LOG, *_arguments(rows, positions, hashes))
    await conn.execute(
        _ADVANCE,
        checkpoint,
        stream,
        fresh[-1].stream_id,
        positions[-1] if positions else cp.last_position,
        hashes[-1] if hashes else cp.head_hash,
    )
    return rows, kept_forms, positions, hashes


def _report_unknown(rows: Sequence[LogEntry], positions: Sequence[int]) -> None:
    for entry, pos in zip(rows, positions, strict=True):
        if entry.event is None:
            log.error(
                "Event stream entry %s is not a valid event (%s); recorded as type unknown at "
                "position %d",
                entry.stream_id,
                entry.error,
                pos,
            )


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
