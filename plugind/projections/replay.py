"""The read models as they were at a point of the log, computed from ``event_log`` alone.

Replaying folds the logged events with the same code the projector uses
(:func:`~plugind.projections.read_models.apply_events`), so a replay cannot drift from the live
projection. It folds into *shadow tables*: empty temporary copies of ``plugins`` and ``tasks``
created inside a transaction that is always rolled back. Because the temporary schema comes first
on the ``search_path``, the read-model SQL (which names its tables unqualified) writes to the
copies; nothing outside the transaction ever sees them, the live tables are not locked, and no
side effect (Redis, plugins) runs.

One trap makes this work only with care: asyncpg caches prepared statements per connection, and
Postgres does not re-plan a cached statement when a new temporary table starts shadowing the
table it was planned against (when the session's temporary schema already existed). A statement
this connection prepared earlier would therefore keep writing to the live table.
:func:`shadow_read_models` sets the search path explicitly (a changed search path makes Postgres
re-plan), drops asyncpg's statement cache on the way in and on the way out, and checks that the
names resolve to the copies before anything is folded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import msgspec
import orjson

from plugind.bus.keys import Keys
from plugind.messages import AnyEvent, decode_event
from plugind.projections._db import Conn
from plugind.projections._entries import UNKNOWN_TYPE
from plugind.projections.queries import (
    EVENT_LOG_CHECKPOINT,
    PluginRow,
    TaskRow,
    list_plugins,
    rfc3339,
)
from plugind.projections.read_models import apply_event, apply_events

log = logging.getLogger(__name__)

READ_MODEL_TABLES: Final = ("plugins", "tasks", "endpoints")

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` with event-log rows folded so far and rows to fold."""


@dataclass(frozen=True, slots=True)
class FoldResult:
    """What folding the log did: rows read, read-model changes skipped, the last position."""

    events: int
    skipped: int
    position: int
    at: datetime | None


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def tasks_stream_of(conn: Conn) -> str | None:
    """The task command stream the live projector used, from the events stream it follows.

    ``command.rejected``/``command.dead_lettered`` from that stream create task rows
    (see :func:`~plugind.projections.read_models.statement_for`), so a fold must know it to agree
    with the projector. None when nothing has been projected yet.
    """
    stream = await conn.fetchval(
        "SELECT stream FROM projection_checkpoints WHERE stream IS NOT NULL"
        " ORDER BY name <> $1, name LIMIT 1",
        EVENT_LOG_CHECKPOINT,
    )
    if not isinstance(stream, str):
        return None
    if stream.startswith("{") and stream.endswith("}:events"):
        return Keys(stream[1 : -len("}:events")]).tasks
    return stream.removesuffix(":events") + ":tasks"


_LOG_BATCH: Final = """
SELECT position, type, at, payload::text AS payload FROM event_log
WHERE position > $1 AND ($2::bigint IS NULL OR position <= $2)
  AND ($3::timestamptz IS NULL OR at <= $3)
ORDER BY position LIMIT $4
"""


async def fold_event_log(
    conn: Conn,
    *,
    tasks_stream: str | None,
    until_position: int | None = None,
    until_time: datetime | None = None,
    batch_size: int = 5000,
    progress: Progress | None = None,
    total: int = 0,
) -> FoldResult:
    """Fold ``event_log`` rows in position order into whatever ``plugins``/``tasks`` resolve to.

    Must run inside a transaction: each batch is applied under a savepoint so that an event whose
    change Postgres refuses is skipped and logged, exactly as the live projector's safe mode skips
    it, instead of aborting the whole fold. ``until_time`` keeps events whose ``at`` is at or
    before it (in log order), ``until_position`` those at or before that position.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    done = skipped = last = 0
    last_at: datetime | None = None
    if progress is not None:
        progress(0, total)
    while True:
        rows = await conn.fetch(_LOG_BATCH, last, until_position, until_time, batch_size)
        if not rows:
            break
        events: list[tuple[int, AnyEvent, datetime]] = []
        for row in rows:
            if row["type"] == UNKNOWN_TYPE:
                continue  # not an event: it never changed a read model
            try:
                events.append((row["position"], decode_event(row["payload"]), row["at"]))
            except msgspec.DecodeError as exc:
                log.error(
                    "Event at position %d no longer decodes, skipped: %s", row["position"], exc
                )
                skipped += 1
        skipped += await _apply_batch(conn, events, tasks_stream)
        done += len(rows)
        last, last_at = rows[-1]["position"], rows[-1]["at"]
        if progress is not None:
            progress(done, max(total, done))
    return FoldResult(done, skipped, last, last_at)


async def _apply_batch(
    conn: Conn, events: Sequence[tuple[int, AnyEvent, datetime]], tasks_stream: str | None
) -> int:
    """Apply a batch in one go; if Postgres refuses it, event by event. Returns how many failed."""
    try:
        async with conn.transaction():
            await apply_events(conn, [(e, at) for _, e, at in events], tasks_stream=tasks_stream)
        return 0
    except asyncpg.PostgresError:
        pass
    failed = 0
    for position, event, at in events:
        try:
            async with conn.transaction():
                await apply_event(conn, event, at=at, tasks_stream=tasks_stream)
        except asyncpg.PostgresError as exc:
            log.error(
                "Read-model update skipped for event %s at position %d: %r",
                event.event_id,
                position,
                exc,
            )
            failed += 1
    return failed


async def live_schema(conn: Conn) -> str:
    """The schema of the live read models (normally ``public``)."""
    schema = await conn.fetchval(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = 'plugins'::regclass"
    )
    assert isinstance(schema, str)
    return schema


@asynccontextmanager
async def shadow_read_models(conn: Conn) -> AsyncIterator[str]:
    """Inside, unqualified ``plugins``/``tasks`` are empty temporary copies; all is rolled back.

    Yields the quoted schema of the live tables, for queries that compare with them. On a
    connection already in a transaction the shadow lives in a savepoint of it; otherwise in a
    REPEATABLE READ transaction, so the log and the live tables are read from one snapshot.
    """
    schema = await live_schema(conn)
    quoted = quote_ident(schema)
    nested = conn.is_in_transaction()
    transaction = conn.transaction(isolation=None if nested else "repeatable_read")
    await transaction.start()
    try:
        for table in READ_MODEL_TABLES:
            await conn.execute(
                f"CREATE TEMPORARY TABLE {table} (LIKE {quoted}.{table} INCLUDING ALL)"
                " ON COMMIT DROP"
            )
        await conn.execute(f"SET LOCAL search_path TO pg_temp, {quoted}")
        await conn.reload_schema_state()  # see the module docstring: no stale statements
        shadowed = await conn.fetchval(
            "SELECT bool_and(to_regclass(t) = to_regclass('pg_temp.' || t))"
            " FROM unnest($1::text[]) AS t",
            list(READ_MODEL_TABLES),
        )
        if not shadowed:
            raise RuntimeError("temporary read-model tables do not shadow the live ones")
        yield quoted
    finally:
        try:
            await transaction.rollback()
        finally:
            await conn.reload_schema_state()


@dataclass(frozen=True, slots=True)
class ReplayState:
    """The read models after folding the log up to ``position`` (0: before the first event)."""

    position: int
    at: datetime | None
    events: int
    skipped: int
    plugins: Mapping[str, tuple[PluginRow, ...]]  # tenant -> its plugins, uninstalled included
    tasks: tuple[TaskRow, ...]

    def task_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for task in self.tasks:
            counts[task.status] = counts.get(task.status, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "at": rfc3339(self.at),
            "events": self.events,
            "skipped": self.skipped,
            "plugins": {
                tenant: [p.to_dict() for p in rows] for tenant, rows in self.plugins.items()
            },
            "task_counts": self.task_counts(),
            "tasks": [t.to_dict() for t in self.tasks],
        }


async def all_tasks(conn: Conn) -> list[TaskRow]:
    """Every row of (whatever ``tasks`` resolves to), oldest first."""
    rows = await conn.fetch(
        """
        SELECT request_id, tenant_id, plugin_id, identifier, access, action, status, attempts,
               created_at, started_at, finished_at, duration_ms,
               result::text AS result, error::text AS error
        FROM tasks ORDER BY created_at, request_id
        """
    )

    def parsed(text: str | None) -> Any:
        return orjson.loads(text) if text is not None else None

    return [
        TaskRow(**{**dict(r), "result": parsed(r["result"]), "error": parsed(r["error"])})
        for r in rows
    ]


async def state_at(
    conn: Conn,
    *,
    until_position: int | None = None,
    until_time: datetime | None = None,
    batch_size: int = 5000,
    tasks_stream: str | None = None,
) -> ReplayState:
    """The plugins (per tenant) and tasks as the events up to that point make them.

    Give at most one bound; none means the head of the log, which equals the live read models.
    ``until_time`` keeps the events whose ``at`` is at or before it, in log order (``at`` is the
    emitting node's clock, so near the bound it is only as exact as the nodes' clocks agree).
    A naive ``until_time`` is taken as UTC. ``tasks_stream`` defaults to the projector's.
    """
    if until_position is not None and until_time is not None:
        raise ValueError("give until_position or until_time, not both")
    if until_time is not None and until_time.tzinfo is None:
        until_time = until_time.replace(tzinfo=UTC)
    if tasks_stream is None:
        tasks_stream = await tasks_stream_of(conn)
    async with shadow_read_models(conn):
        fold = await fold_event_log(
            conn,
            tasks_stream=tasks_stream,
            until_position=until_position,
            until_time=until_time,
            batch_size=batch_size,
        )
        plugins: dict[str, list[PluginRow]] = {}
        for plugin in await list_plugins(conn, status=None):
            plugins.setdefault(plugin.tenant_id, []).append(plugin)
        tasks = await all_tasks(conn)
    return ReplayState(
        position=fold.position,
        at=fold.at,
        events=fold.events,
        skipped=fold.skipped,
        plugins={tenant: tuple(rows) for tenant, rows in plugins.items()},
        tasks=tuple(tasks),
    )
