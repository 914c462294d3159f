"""Rebuild the read models from ``event_log``, and check that a rebuild would change nothing.

The read models are a cache of the log: if a bug or a hand edit ever makes ``plugins`` or
``tasks`` disagree with the events, :func:`rebuild_read_models` recomputes them with the
projector's own fold (no Redis, no plugin, no side effect), and :func:`read_models_equal_rebuild`
is the audit that says whether that is needed.

Locking: the projector's advisory lock cannot be used, because the active projector holds it
(per namespace, on a session) for as long as it runs. Instead a rebuild locks the checkpoint rows
first, which is the projector's first step in every batch, and then the two tables. An in-flight
batch finishes before the rebuild starts, the next one waits until the rebuild commits, and the
lock order is the projector's, so the two cannot deadlock. The tables are emptied with DELETE
under an EXCLUSIVE lock rather than TRUNCATE (ACCESS EXCLUSIVE): readers such as the HTTP API
keep seeing the old rows until the rebuild commits instead of blocking for its whole length.

No read-model statement uses ``now()``: every timestamp comes from the event's ``at``, so a
rebuild reproduces the live rows column for column and the comparison ignores nothing
(:data:`IGNORED_COLUMNS` is where such a column would go).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

from plugind.projections._db import Conn
from plugind.projections.replay import (
    Progress,
    fold_event_log,
    shadow_read_models,
    tasks_stream_of,
)

IGNORED_COLUMNS: Final[dict[str, frozenset[str]]] = {
    "plugins": frozenset(),
    "tasks": frozenset(),
    "endpoints": frozenset(),
}
TABLE_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "plugins": ("tenant_id", "plugin_id"),
    "tasks": ("request_id",),
    "endpoints": ("endpoint_id",),
}


@dataclass(frozen=True, slots=True)
class RebuildResult:
    """``events``: log rows folded; ``skipped``: changes Postgres refused (as live, logged)."""

    events: int
    skipped: int
    head_position: int
    plugins: int
    tasks: int
    duration_s: float
    endpoints: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "skipped": self.skipped,
            "head_position": self.head_position,
            "plugins": self.plugins,
            "tasks": self.tasks,
            "endpoints": self.endpoints,
            "duration_s": round(self.duration_s, 3),
        }


async def rebuild_read_models(
    conn: Conn,
    *,
    progress: Progress | None = None,
    batch_size: int = 5000,
    tasks_stream: str | None = None,
) -> RebuildResult:
    """Empty the read models and fold every logged event back in, in ONE transaction.

    ``progress(done, total)`` is called after each batch of ``batch_size`` log rows.
    ``tasks_stream`` defaults to the one the projector follows (from its checkpoint).
    """
    started = time.monotonic()
    async with conn.transaction():
        await conn.execute(
            "SELECT name FROM projection_checkpoints ORDER BY name FOR UPDATE"
        )  # see the module docstring: the projector's lock order
        await conn.execute("LOCK TABLE plugins, tasks, endpoints IN EXCLUSIVE MODE")
        if tasks_stream is None:
            tasks_stream = await tasks_stream_of(conn)
        total = int(await conn.fetchval("SELECT count(*) FROM event_log"))
        await conn.execute("DELETE FROM tasks")
        await conn.execute("DELETE FROM plugins")
        await conn.execute("DELETE FROM endpoints")
        fold = await fold_event_log(
            conn,
            tasks_stream=tasks_stream,
            batch_size=batch_size,
            progress=progress,
            total=total,
        )
        plugins = int(await conn.fetchval("SELECT count(*) FROM plugins"))
        tasks = int(await conn.fetchval("SELECT count(*) FROM tasks"))
        endpoints = int(await conn.fetchval("SELECT count(*) FROM endpoints"))
    return RebuildResult(
        events=fold.events,
        skipped=fold.skipped,
        head_position=fold.position,
        plugins=plugins,
        tasks=tasks,
        duration_s=time.monotonic() - started,
        endpoints=endpoints,
    )


@dataclass(frozen=True, slots=True)
class DiffEntry:
    """One read-model row that differs. ``kind``: ``missing`` (only the rebuild has it),
    ``unexpected`` (only the live table has it) or ``changed``."""

    table: str
    key: tuple[str, ...]
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "key": list(self.key), "kind": self.kind}


@dataclass(frozen=True, slots=True)
class Diff:
    """Live read models against a rebuild from the same snapshot of the log.

    ``plugins_differing``/``tasks_differing`` count every differing row; the entries list at most
    ``limit`` of each, so a wholly broken table does not flood the report.
    """

    plugins: tuple[DiffEntry, ...]
    tasks: tuple[DiffEntry, ...]
    plugins_differing: int
    tasks_differing: int
    events: int
    head_position: int
    endpoints: tuple[DiffEntry, ...] = ()
    endpoints_differing: int = 0

    @property
    def ok(self) -> bool:
        return not (self.plugins_differing or self.tasks_differing or self.endpoints_differing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "head_position": self.head_position,
            "plugins_differing": self.plugins_differing,
            "tasks_differing": self.tasks_differing,
            "endpoints_differing": self.endpoints_differing,
            "plugins": [e.to_dict() for e in self.plugins],
            "tasks": [e.to_dict() for e in self.tasks],
            "endpoints": [e.to_dict() for e in self.endpoints],
            "ignored_columns": {t: sorted(c) for t, c in IGNORED_COLUMNS.items() if c},
        }


async def read_models_equal_rebuild(
    conn: Conn, *, batch_size: int = 5000, limit: int = 100, tasks_stream: str | None = None
) -> Diff:
    """Rebuild into shadow tables (rolled back) and compare them with the live read models.

    Nothing live is locked or written: the projector keeps running, and the comparison is
    consistent because the log and the live tables are read from one snapshot.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if tasks_stream is None:
        tasks_stream = await tasks_stream_of(conn)
    async with shadow_read_models(conn) as schema:
        fold = await fold_event_log(conn, tasks_stream=tasks_stream, batch_size=batch_size)
        found: dict[str, tuple[list[DiffEntry], int]] = {}
        for table in TABLE_KEYS:
            found[table] = await _differing(conn, table, f"{schema}.{table}", limit)
    return Diff(
        plugins=tuple(found["plugins"][0]),
        tasks=tuple(found["tasks"][0]),
        plugins_differing=found["plugins"][1],
        tasks_differing=found["tasks"][1],
        events=fold.events,
        head_position=fold.position,
        endpoints=tuple(found["endpoints"][0]),
        endpoints_differing=found["endpoints"][1],
    )


async def _differing(conn: Conn, table: str, live: str, limit: int) -> tuple[list[DiffEntry], int]:
    """Rows of ``pg_temp.<table>`` and ``live`` that differ in any compared column.

    The columns come from the live table, so a column a later migration adds is compared too.
    jsonb compares by value (``1e16`` equals ``10000000000000000``), as it should.
    """
    names = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = $1::text::regclass"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        live,
    )
    columns = [r["attname"] for r in names if r["attname"] not in IGNORED_COLUMNS[table]]
    keys = TABLE_KEYS[table]

    def row(alias: str) -> str:
        return "ROW(" + ", ".join(f'{alias}."{c}"' for c in columns) + ")"

    join = " AND ".join(f'r."{k}" = l."{k}"' for k in keys)
    key_sql = ", ".join(f'coalesce(r."{k}", l."{k}") AS "{k}"' for k in keys)
    rows = await conn.fetch(
        f"""
        SELECT {key_sql},
               CASE WHEN l."{keys[0]}" IS NULL THEN 'missing'
                    WHEN r."{keys[0]}" IS NULL THEN 'unexpected'
                    ELSE 'changed' END AS kind,
               count(*) OVER () AS total
        FROM pg_temp.{table} r FULL JOIN {live} l ON {join}
        WHERE {row("r")} IS DISTINCT FROM {row("l")}
        ORDER BY 1{"".join(f", {i}" for i in range(2, len(keys) + 1))}
        LIMIT $1
        """,
        limit,
    )
    entries = [DiffEntry(table, tuple(r[k] for k in keys), r["kind"]) for r in rows]
    return entries, int(rows[0]["total"]) if rows else 0
