"""Fill ``event_log`` and ``tasks`` with a history of finished calc tasks, in SQL (fast).

Each task is a ``task.started`` and a ``task.succeeded`` event, as the worker would have emitted
them, and its ``succeeded`` row, so the log folds (``projections rebuild``) into the same rows.
Stream ids are ``1-<position>``, below any real entry id, and the projector's checkpoint is put
at the last of them, so a projector started afterwards carries on after the history. The hashes
are not a chain (a verifier would reject the history); only the checkpoint's head is real.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import asyncpg

from plugind.projections.migrate import migrate

_AT: Final = """to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""

_EVENTS: Final = f"""
INSERT INTO event_log (position, stream_id, event_id, type, request_id, tenant_id, plugin_id,
                       at, payload, hash)
SELECT pos, '1-' || pos, eid, typ, rid, 'default', 'acme/calc', ts, payload,
       sha256(convert_to(pos::text, 'UTF8'))
FROM (
  SELECT i, rid, ts, k,
         (2 * i - 2 + k)::bigint AS pos,
         md5(i::text || '/' || k)::uuid::text AS eid,
         CASE k WHEN 1 THEN 'task.started' ELSE 'task.succeeded' END AS typ,
         CASE k WHEN 1 THEN
           jsonb_build_object('type', 'task.started', 'v', 1, 'event_id',
             md5(i::text || '/' || k)::uuid::text, 'request_id', rid, 'tenant_id', 'default',
             'at', {_AT}, 'node', 'prefill', 'plugin_id', 'acme/calc',
             'identifier', $3::text, 'access', 'tool', 'action', 'invoke_tool', 'attempt', 1)
         ELSE
           jsonb_build_object('type', 'task.succeeded', 'v', 1, 'event_id',
             md5(i::text || '/' || k)::uuid::text, 'request_id', rid, 'tenant_id', 'default',
             'at', {_AT}, 'node', 'prefill', 'plugin_id', $3::text,
             'result', jsonb_build_object('chunks', jsonb_build_array(jsonb_build_object(
               'type', 'text', 'message', jsonb_build_object('text', '3'), 'meta', null))),
             'duration_ms', 1.5)
         END AS payload
  FROM (
    SELECT i, md5(i::text)::uuid::text AS rid,
           $4::timestamptz + i * interval '1 millisecond' AS ts
    FROM generate_series($1::bigint, $2::bigint) AS i
  ) AS t, (VALUES (1), (2)) AS kk(k)
) AS e
ORDER BY pos
"""

_TASKS: Final = """
INSERT INTO tasks (request_id, tenant_id, plugin_id, identifier, access, action, status,
                   attempts, created_at, started_at, finished_at, duration_ms, result, error)
SELECT md5(i::text)::uuid::text, 'default', 'acme/calc', $3::text, 'tool', 'invoke_tool',
       'succeeded', 1, ts, ts, ts, 1.5,
       jsonb_build_object('chunks', jsonb_build_array(jsonb_build_object(
         'type', 'text', 'message', jsonb_build_object('text', '3'), 'meta', null))),
       NULL
FROM (SELECT i, $4::timestamptz + i * interval '1 millisecond' AS ts
      FROM generate_series($1::bigint, $2::bigint) AS i) AS t
"""


async def prefill(
    database_url: str,
    *,
    tasks: int,
    events_stream: str,
    identifier: str,
    schema: str = "plugind",
    chunk: int = 100_000,
    say: Callable[[str], None] = print,
) -> float:
    """Migrate, then add ``tasks`` finished tasks (``2 * tasks`` events); returns seconds."""
    started = time.perf_counter()
    conn: asyncpg.Connection = await asyncpg.connect(
        database_url, server_settings={"search_path": schema}
    )
    try:
        await migrate(conn, schema=schema)
        base = datetime(2020, 1, 1, tzinfo=UTC)
        for first in range(1, tasks + 1, chunk):
            last = min(first + chunk - 1, tasks)
            async with conn.transaction():
                await conn.execute(_EVENTS, first, last, identifier, base)
                await conn.execute(_TASKS, first, last, identifier, base)
            say(f"  pre-filled {last}/{tasks} tasks ({2 * last} events)")
        head = await conn.fetchrow(
            "SELECT position, stream_id, hash FROM event_log ORDER BY position DESC LIMIT 1"
        )
        assert head is not None
        await conn.execute(
            "INSERT INTO projection_checkpoints (name, stream, last_stream_id, last_position,"
            " head_hash) VALUES ('event_log', $1, $2, $3, $4)"
            " ON CONFLICT (name) DO UPDATE SET stream = $1, last_stream_id = $2,"
            " last_position = $3, head_hash = $4",
            events_stream,
            head["stream_id"],
            head["position"],
            head["hash"],
        )
        await conn.execute("VACUUM (ANALYZE) event_log")
        await conn.execute("VACUUM (ANALYZE) tasks")
    finally:
        await conn.close()
    return time.perf_counter() - started
