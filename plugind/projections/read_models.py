"""How each event changes the ``plugins``, ``tasks`` and ``endpoints`` read models.

Plain functions of (connection, event) with no side effects beyond those two tables, so the
projector, a rebuild and a point-in-time replay all fold events the same way. Every statement is
idempotent and guarded so a terminal task row is final: the first terminal event for a request
wins, and anything later (a duplicate, a late ``task.started``) leaves it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from plugind.messages import (
    AnyEvent,
    CommandDeadLettered,
    CommandRejected,
    EndpointDisabled,
    EndpointEnabled,
    EndpointEvent,
    EndpointRemoved,
    EndpointSetUp,
    EndpointUpdated,
    Installed,
    TaskFailed,
    TaskStarted,
    TaskSucceeded,
    TaskTimedOut,
    Uninstalled,
    encode,
)
from plugind.projections._db import Conn

TASK_STATUSES: Final = ("running", "succeeded", "failed", "timed_out", "rejected", "dead_lettered")
TERMINAL_TASK_STATUSES: Final = frozenset(TASK_STATUSES) - {"running"}
PLUGIN_STATUSES: Final = ("installed", "uninstalled")


def short_plugin_id(plugin_ref: str) -> str:
    """``author/name`` of a plugin reference that may be a full ``author/name:version@sha``."""
    return plugin_ref.split(":", 1)[0]


def _identifier(plugin_ref: str) -> str | None:
    return plugin_ref if ":" in plugin_ref else None


def parse_at(value: str) -> datetime | None:
    """An event's RFC 3339 ``at`` as an aware datetime, or None if it does not parse."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _json(value: Any) -> str:
    return encode(value).decode() if value is not None else "null"


_TASK_STARTED: Final = """
INSERT INTO tasks AS t (request_id, tenant_id, plugin_id, identifier, access, action,
                        status, attempts, created_at, started_at)
VALUES ($1, $2, $3, $4, $5, $6, 'running', $7, $8, $8)
ON CONFLICT (request_id) DO UPDATE SET
    plugin_id = EXCLUDED.plugin_id, identifier = EXCLUDED.identifier,
    access = EXCLUDED.access, action = EXCLUDED.action,
    attempts = GREATEST(t.attempts, EXCLUDED.attempts), started_at = EXCLUDED.started_at
WHERE t.status = 'running'
"""

_TASK_ENDED: Final = """
INSERT INTO tasks AS t (request_id, tenant_id, plugin_id, identifier, status, created_at,
                        finished_at, duration_ms, result, error)
VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8::text::jsonb, $9::text::jsonb)
ON CONFLICT (request_id) DO UPDATE SET
    status = EXCLUDED.status, finished_at = EXCLUDED.finished_at,
    duration_ms = EXCLUDED.duration_ms, result = EXCLUDED.result, error = EXCLUDED.error,
    plugin_id = coalesce(t.plugin_id, EXCLUDED.plugin_id),
    identifier = coalesce(t.identifier, EXCLUDED.identifier)
WHERE t.status = 'running'
"""

_COMMAND_FAILED_UPDATE: Final = """
UPDATE tasks SET status = $2, finished_at = $3, error = $4::text::jsonb
WHERE request_id = $1 AND status = 'running'
"""

_COMMAND_FAILED_UPSERT: Final = """
INSERT INTO tasks AS t (request_id, tenant_id, status, created_at, finished_at, error)
VALUES ($1, $5, $2, $3, $3, $4::text::jsonb)
ON CONFLICT (request_id) DO UPDATE SET
    status = EXCLUDED.status, finished_at = EXCLUDED.finished_at, error = EXCLUDED.error
WHERE t.status = 'running'
"""

_INSTALLED: Final = """
INSERT INTO plugins AS p (tenant_id, plugin_id, identifier, version, status, manifest,
                          installed_at, updated_at)
VALUES ($1, $2, $3, $4, 'installed', $5::text::jsonb, $6, $6)
ON CONFLICT (tenant_id, plugin_id) DO UPDATE SET
    identifier = EXCLUDED.identifier, version = EXCLUDED.version, status = 'installed',
    manifest = EXCLUDED.manifest, installed_at = EXCLUDED.installed_at,
    updated_at = EXCLUDED.updated_at
"""

_UNINSTALLED: Final = """
UPDATE plugins SET status = 'uninstalled', updated_at = $3
WHERE tenant_id = $1 AND plugin_id = $2
"""

_ENDPOINT_SET_UP: Final = """
INSERT INTO endpoints (endpoint_id, tenant_id, plugin_id, hook_id, name, user_id, enabled,
                       settings, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, true, $7::text::jsonb, $8, $8)
ON CONFLICT (endpoint_id) DO NOTHING
"""

_ENDPOINT_UPDATED: Final = """
UPDATE endpoints SET name = $3, settings = $4::text::jsonb, updated_at = $5
WHERE endpoint_id = $1 AND tenant_id = $2
"""

_ENDPOINT_SWITCHED: Final = """
UPDATE endpoints SET enabled = $3, updated_at = $4 WHERE endpoint_id = $1 AND tenant_id = $2
"""

_ENDPOINT_REMOVED: Final = "DELETE FROM endpoints WHERE endpoint_id = $1 AND tenant_id = $2"


Statement = tuple[str, tuple[Any, ...]]


def statement_for(
    event: AnyEvent, *, at: datetime, tasks_stream: str | None = None
) -> Statement | None:
    """The SQL statement (and arguments) that folds ``event`` in; None if it changes nothing.

    ``at`` is the event's time as recorded in ``event_log``. ``tasks_stream`` is the key of the
    task command stream: a rejected or dead-lettered command from it gets a task row even if no
    task event came first, so ``GET /api/v1/tasks/{id}`` can say what happened to it.
    """
    match event:
        case TaskStarted():
            return _TASK_STARTED, (
                event.request_id,
                event.tenant_id,
                short_plugin_id(event.plugin_id),
                event.identifier,
                event.access,
                event.action,
                event.attempt,
                at,
            )
        case TaskSucceeded():
            return _task_ended(event, at, "succeeded", result=_json(event.result))
        case TaskFailed():
            return _task_ended(event, at, "failed", error=_json(event.error))
        case TaskTimedOut():
            timeout = {
                "code": "timeout",
                "message": f"Task timed out after {event.timeout_s:g}s",
                "timeout_s": event.timeout_s,
            }
            return _task_ended(event, at, "timed_out", error=_json(timeout))
        case CommandRejected() | CommandDeadLettered():
            status = "rejected" if isinstance(event, CommandRejected) else "dead_lettered"
            error = _json(event.error)
            if tasks_stream is not None and event.stream == tasks_stream and event.request_id:
                return _COMMAND_FAILED_UPSERT, (
                    event.request_id,
                    status,
                    at,
                    error,
                    event.tenant_id,
                )
            return _COMMAND_FAILED_UPDATE, (event.request_id, status, at, error)
        case Installed():
            return _INSTALLED, (
                event.tenant_id,
                short_plugin_id(event.plugin_id),
                event.identifier,
                event.version,
                _json(event.manifest),
                at,
            )
        case Uninstalled():
            return _UNINSTALLED, (event.tenant_id, short_plugin_id(event.plugin_id), at)
        case EndpointSetUp():
            return _ENDPOINT_SET_UP, (
                event.endpoint_id,
                event.tenant_id,
                event.plugin_id,
                event.hook_id,
                event.name,
                event.user_id,
                _json(event.settings),
                at,
            )
        case EndpointUpdated():
            return _ENDPOINT_UPDATED, (
                event.endpoint_id,
                event.tenant_id,
                event.name,
                _json(event.settings),
                at,
            )
        case EndpointEnabled() | EndpointDisabled():
            enabled = isinstance(event, EndpointEnabled)
            return _ENDPOINT_SWITCHED, (event.endpoint_id, event.tenant_id, enabled, at)
        case EndpointRemoved():
            return _ENDPOINT_REMOVED, (event.endpoint_id, event.tenant_id)
        case _:
            # progress, install_started, install_failed, backwards calls: the event log is
            # their record
            return None


def _row_key(event: AnyEvent) -> tuple[str, ...]:
    """The read-model row an event's statement touches."""
    if isinstance(event, Installed | Uninstalled):
        return ("plugin", event.tenant_id, short_plugin_id(event.plugin_id))
    if isinstance(event, EndpointEvent):
        return ("endpoint", event.endpoint_id)
    return ("task", event.request_id)


def _task_ended(
    event: TaskSucceeded | TaskFailed | TaskTimedOut,
    at: datetime,
    status: str,
    *,
    result: str | None = None,
    error: str | None = None,
) -> Statement:
    return _TASK_ENDED, (
        event.request_id,
        event.tenant_id,
        short_plugin_id(event.plugin_id),
        _identifier(event.plugin_id),
        status,
        at,
        event.duration_ms,
        result,
        error,
    )


async def apply_event(
    conn: Conn, event: AnyEvent, *, at: datetime, tasks_stream: str | None = None
) -> None:
    """Fold one event into the read models (see :func:`statement_for`)."""
    statement = statement_for(event, at=at, tasks_stream=tasks_stream)
    if statement is not None:
        await conn.execute(statement[0], *statement[1])


async def apply_events(
    conn: Conn,
    events: Sequence[tuple[AnyEvent, datetime]],
    *,
    tasks_stream: str | None = None,
) -> None:
    """Fold ``events`` (in log order) with a few set-based statements, not one each.

    Only events on the same row must keep their order, so the n-th statement of each row goes
    to round n; within a round every row is distinct, and statements of one kind run together:
    the task statements as one ``INSERT … SELECT FROM unnest(…)`` each, the rare others with
    ``executemany``. A task's ``task.started`` directly followed (on its row) by its terminal
    event becomes one statement that writes the row as the pair would (:data:`_TASK_RAN`), so a
    task started and ended within a batch is written once, not inserted and then updated.
    The result equals applying the events one by one with :func:`apply_event`.
    """
    rows: dict[tuple[str, ...], list[Statement]] = {}
    for event, at in events:
        statement = statement_for(event, at=at, tasks_stream=tasks_stream)
        if statement is None:
            continue
        sequence = rows.setdefault(_row_key(event), [])
        previous = sequence[-1] if sequence else None
        if previous is not None and previous[0] == _TASK_STARTED and statement[0] == _TASK_ENDED:
            sequence[-1] = (_TASK_RAN, _ran(previous[1], statement[1]))
        else:
            sequence.append(statement)
    rounds: list[dict[str, list[tuple[Any, ...]]]] = []
    for sequence in rows.values():
        for index, (sql, args) in enumerate(sequence):
            if index == len(rounds):
                rounds.append({})
            rounds[index].setdefault(sql, []).append(args)
    for by_sql in rounds:
        for sql, arg_rows in by_sql.items():
            bulk = _BULK.get(sql)
            if bulk is not None and len(arg_rows) > 1:
                columns = [list(column) for column in zip(*arg_rows, strict=True)]
                await conn.execute(bulk, *columns)
            else:
                await conn.executemany(sql, arg_rows)


def _ran(started: tuple[Any, ...], ended: tuple[Any, ...]) -> tuple[Any, ...]:
    """The arguments of :data:`_TASK_RAN` for a ``_TASK_STARTED`` then ``_TASK_ENDED`` pair.

    Applied in turn, the pair leaves the row with the started event's ids, access, action,
    attempt and times, and the ended event's status, finish, duration and outcome (the ended
    statement's ``coalesce`` keeps the started event's non-null ``plugin_id`` and
    ``identifier``); where the row is already terminal neither changes it.
    """
    request_id, tenant_id, plugin_id, identifier, access, action, attempt, started_at = started
    _rid, _tenant, _plugin, _identifier, status, finished_at, duration, result, error = ended
    return (
        request_id,
        tenant_id,
        plugin_id,
        identifier,
        access,
        action,
        attempt,
        started_at,
        status,
        finished_at,
        duration,
        result,
        error,
    )


_TASK_RAN: Final = """
INSERT INTO tasks AS t (request_id, tenant_id, plugin_id, identifier, access, action, status,
                        attempts, created_at, started_at, finished_at, duration_ms, result, error)
VALUES ($1, $2, $3, $4, $5, $6, $9, $7, $8, $8, $10, $11, $12::text::jsonb, $13::text::jsonb)
ON CONFLICT (request_id) DO UPDATE SET
    plugin_id = EXCLUDED.plugin_id, identifier = EXCLUDED.identifier,
    access = EXCLUDED.access, action = EXCLUDED.action,
    attempts = GREATEST(t.attempts, EXCLUDED.attempts), started_at = EXCLUDED.started_at,
    status = EXCLUDED.status, finished_at = EXCLUDED.finished_at,
    duration_ms = EXCLUDED.duration_ms, result = EXCLUDED.result, error = EXCLUDED.error
WHERE t.status = 'running'
"""

# The task statements over arrays, one row per element: the same effect as ``executemany`` of
# the statement they are keyed by, in one execution (rows within a round are distinct).
_BULK: Final[dict[str, str]] = {
    _TASK_STARTED: """
INSERT INTO tasks AS t (request_id, tenant_id, plugin_id, identifier, access, action,
                        status, attempts, created_at, started_at)
SELECT r, tn, p, i, ac, an, 'running', n, a, a
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::timestamptz[]) AS u(r, tn, p, i, ac, an, n, a)
ON CONFLICT (request_id) DO UPDATE SET
    plugin_id = EXCLUDED.plugin_id, identifier = EXCLUDED.identifier,
    access = EXCLUDED.access, action = EXCLUDED.action,
    attempts = GREATEST(t.attempts, EXCLUDED.attempts), started_at = EXCLUDED.started_at
WHERE t.status = 'running'
""",
    _TASK_ENDED: """
INSERT INTO tasks AS t (request_id, tenant_id, plugin_id, identifier, status, created_at,
                        finished_at, duration_ms, result, error)
SELECT r, tn, p, i, s, a, a, d, res::jsonb, err::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
            $7::float8[], $8::text[], $9::text[]) AS u(r, tn, p, i, s, a, d, res, err)
ON CONFLICT (request_id) DO UPDATE SET
    status = EXCLUDED.status, finished_at = EXCLUDED.finished_at,
    duration_ms = EXCLUDED.duration_ms, result = EXCLUDED.result, error = EXCLUDED.error,
    plugin_id = coalesce(t.plugin_id, EXCLUDED.plugin_id),
    identifier = coalesce(t.identifier, EXCLUDED.identifier)
WHERE t.status = 'running'
""",
    _TASK_RAN: """
INSERT INTO tasks AS t (request_id, tenant_id, plugin_id, identifier, access, action, status,
                        attempts, created_at, started_at, finished_at, duration_ms, result, error)
SELECT r, tn, p, i, ac, an, s, n, a, a, f, d, res::jsonb, err::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::timestamptz[], $9::text[], $10::timestamptz[], $11::float8[],
            $12::text[], $13::text[]) AS u(r, tn, p, i, ac, an, n, a, s, f, d, res, err)
ON CONFLICT (request_id) DO UPDATE SET
    plugin_id = EXCLUDED.plugin_id, identifier = EXCLUDED.identifier,
    access = EXCLUDED.access, action = EXCLUDED.action,
    attempts = GREATEST(t.attempts, EXCLUDED.attempts), started_at = EXCLUDED.started_at,
    status = EXCLUDED.status, finished_at = EXCLUDED.finished_at,
    duration_ms = EXCLUDED.duration_ms, result = EXCLUDED.result, error = EXCLUDED.error
WHERE t.status = 'running'
""",
}
