"""The projector: folds ``{ns}:events`` into Postgres, one transaction per batch.

Per batch it appends the events to ``event_log`` (gap-free positions, hash chained from the
checkpoint's head), applies the read-model changes and advances the checkpoint in ONE
transaction, and only then XACKs. A crash between commit and ack replays the batch, and every
entry at or below the checkpoint's stream id is skipped, so the replay changes nothing.

One projector is active per namespace: it holds a session-level advisory lock on a connection
kept for its lifetime; the others poll for the lock as standbys. The checkpoint row is also
locked ``FOR UPDATE`` in every batch, so even two projectors that both believed they were active
could not interleave positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from plugind.bus.codec import read_entries, text
from plugind.bus.groups import ensure_group
from plugind.bus.keys import PROJECTOR_GROUP, Keys
from plugind.projections._db import advisory_key
from plugind.projections._entries import LogEntry, decode_entry, stream_id_key
from plugind.projections.hashchain import chain_hash
from plugind.projections.lag import projector_lag
from plugind.projections.queries import (
    EVENT_LOG_CHECKPOINT,
    Checkpoint,
    get_checkpoint,
    logged_event_ids,
)
from plugind.projections.read_models import apply_event, apply_events

__all__ = ["EVENT_LOG_CHECKPOINT", "ProjectionConflictError", "Projector", "projector_lock_key"]

log = logging.getLogger(__name__)


class ProjectionConflictError(RuntimeError):
    """The database's event log follows another namespace's events stream."""


def projector_lock_key(keys: Keys) -> int:
    return advisory_key(f"plugind:projector:{keys.namespace}")


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


class Projector:
    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool,
        keys: Keys,
        node: str,
        *,
        batch_size: int = 500,
        block_ms: int = 1000,
        standby_interval: float = 2.0,
        checkpoint: str = EVENT_LOG_CHECKPOINT,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self.node = node
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.standby_interval = standby_interval
        self.checkpoint = checkpoint
        self._conn: PoolConnectionProxy | None = None
        self._read_pending = True
        self._safe_mode = False
        self._lock_key = projector_lock_key(keys)

    @property
    def active(self) -> bool:
        """True while this projector holds the namespace's lock."""
        return self._conn is not None

    async def try_activate(self) -> bool:
        """Take the namespace's projector lock if it is free; returns whether we hold it."""
        if self._conn is not None:
            return True
        conn = await self.pool.acquire(timeout=10)
        try:
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._lock_key)
        except BaseException:
            await self.pool.release(conn)
            raise
        if not got:
            await self.pool.release(conn)
            return False
        self._conn = conn
        self._read_pending = True
        try:
            await ensure_group(self.redis, self.keys.events, PROJECTOR_GROUP)
            await self._claim_orphans()
        except BaseException:
            await self.deactivate()
            raise
        log.info("Projector active for namespace %s (node %s)", self.keys.namespace, self.node)
        return True

    async def deactivate(self) -> None:
        """Give up the lock (a standby takes over); safe to call when not active."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", self._lock_key)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            pass  # the session is gone, and its lock with it
        finally:
            await self.pool.release(conn)

    close = deactivate

    async def run(self) -> None:
        """Project until cancelled: standby until the lock is ours, then batch after batch."""
        backoff = 0.5
        waiting_logged = False
        try:
            while True:
                try:
                    if not self.active:
                        if not await self.try_activate():
                            if not waiting_logged:
                                log.info(
                                    "Projector standby for namespace %s: another one is active",
                                    self.keys.namespace,
                                )
                                waiting_logged = True
                            await anyio.sleep(self.standby_interval)
                            continue
                        waiting_logged = False
                    await self.run_once()
                    backoff = 0.5
                except ProjectionConflictError:
                    raise
                except Exception as exc:  # keep projecting: the daemon must outlive one bad batch
                    expected = (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
                    log.error(
                        "Projector batch failed, retrying in %.1fs: %r",
                        backoff,
                        exc,
                        exc_info=not isinstance(exc, expected),
                    )
                    self._read_pending = True
                    if isinstance(exc, asyncpg.PostgresError):
                        self._safe_mode = True
                    if self._conn is not None and self._conn.is_closed():
                        await self.deactivate()
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            with anyio.move_on_after(5, shield=True):
                await self.deactivate()

    async def run_once(self) -> int:
        """Read and commit at most one batch; returns how many events were appended to the log.

        Returns 0 without reading when another projector holds the lock.
        """
        if not self.active and not await self.try_activate():
            return 0
        entries = await self._read()
        if not entries:
            return 0
        # A batch read is committed and acknowledged even when shutdown cancels us meanwhile:
        # cancelling inside the transaction would only throw the work away (and make asyncpg
        # reset the connection). The bound keeps a wedged database from holding up shutdown.
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            applied = await self._commit(entries)
            await self.redis.xack(self.keys.events, PROJECTOR_GROUP, *(sid for sid, _ in entries))
            self._safe_mode = False
            return applied
        return 0

    async def lag(self) -> int:
        return await projector_lag(self.redis, self.keys)

    async def _claim_orphans(self) -> None:
        """Take over entries a dead projector read but never acknowledged.

        Without this, a standby that takes over would read only new entries, commit past the dead
        one's batch and the checkpoint would then skip that batch for ever.
        """
        cursor = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                self.keys.events,
                PROJECTOR_GROUP,
                self.node,
                0,
                cursor,
                count=self.batch_size,
            )
            cursor = text(reply[0])  # (justid=True would make redis-py drop the cursor)
            if cursor == "0-0":
                return

    async def _read(self) -> list[tuple[str, dict[Any, Any]]]:
        try:
            if self._read_pending:
                reply = await self.redis.xreadgroup(
                    PROJECTOR_GROUP, self.node, {self.keys.events: "0"}, count=self.batch_size
                )
                entries = read_entries(reply)
                if entries:
                    return entries
                self._read_pending = False
            reply = await self.redis.xreadgroup(
                PROJECTOR_GROUP,
                self.node,
                {self.keys.events: ">"},
                count=self.batch_size,
                block=self.block_ms or None,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await ensure_group(self.redis, self.keys.events, PROJECTOR_GROUP)
            return []
        return read_entries(reply)

    async def _commit(self, raw: Sequence[tuple[str, dict[Any, Any] | None]]) -> int:
        conn = self._conn
        assert conn is not None
        async with conn.transaction():
            cp = await self._lock_checkpoint(conn)
            last_key = stream_id_key(cp.last_stream_id) if cp.last_stream_id else None
            fresh = [
                decode_entry(sid, fields)
                for sid, fields in raw
                if last_key is None or stream_id_key(sid) > last_key
            ]
            if not fresh:
                return 0
            rows = await self._drop_duplicates(conn, fresh)
            position, head = cp.last_position, cp.head_hash
            if rows:
                normalised = [
                    r["j"] for r in await conn.fetch(_NORMALISE, [e.payload for e in rows])
                ]
                positions, hashes = [], []
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
                            "Event stream entry %s is not a valid event (%s); recorded as "
                            "type unknown at position %d",
                            entry.stream_id,
                            entry.error,
                            pos,
                        )
                await self._apply(conn, rows, positions)
            await conn.execute(
                """
                UPDATE projection_checkpoints
                SET stream = $2, last_stream_id = $3, last_position = $4, head_hash = $5,
                    updated_at = now()
                WHERE name = $1
                """,
                self.checkpoint,
                self.keys.events,
                fresh[-1].stream_id,
                position,
                head,
            )
        log.debug("Projected %d events up to position %d", len(rows), position)
        return len(rows)

    async def _lock_checkpoint(self, conn: PoolConnectionProxy) -> Checkpoint:
        await conn.execute(
            "INSERT INTO projection_checkpoints (name, stream) VALUES ($1, $2)"
            " ON CONFLICT (name) DO NOTHING",
            self.checkpoint,
            self.keys.events,
        )
        cp = await get_checkpoint(conn, self.checkpoint, for_update=True)
        assert cp is not None
        if cp.stream is not None and cp.stream != self.keys.events:
            raise ProjectionConflictError(
                f"this database's event log follows {cp.stream}, not {self.keys.events}: "
                "use one database per namespace"
            )
        return cp

    async def _drop_duplicates(
        self, conn: PoolConnectionProxy, entries: list[LogEntry]
    ) -> list[LogEntry]:
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

    async def _apply(
        self, conn: PoolConnectionProxy, rows: list[LogEntry], positions: list[int]
    ) -> None:
        events = [(e.event, e.at) for e in rows if e.event is not None]
        if not self._safe_mode:
            await apply_events(conn, events, tasks_stream=self.keys.tasks)
            return
        # After a failed batch, isolate each change so one poisonous event cannot wedge the
        # projector: it stays in the log, its read-model change is skipped and logged.
        for entry, position in zip(rows, positions, strict=True):
            if entry.event is None:
                continue
            try:
                async with conn.transaction():
                    await apply_event(conn, entry.event, at=entry.at, tasks_stream=self.keys.tasks)
            except asyncpg.PostgresError as exc:
                log.error(
                    "Read-model update skipped for event %s (%s) at position %d: %r",
                    entry.event_id,
                    entry.type,
                    position,
                    exc,
                )
