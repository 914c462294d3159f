"""Every read of ``plugins``, ``tasks``, ``event_log`` and ``projection_checkpoints``.

One module so a schema change has one place to follow, and so the CLI, HTTP and the projector
see the same rows the same way. Results are frozen dataclasses; those the read API serves have
``to_dict()`` giving its JSON. Writes stay with the projector (``read_models``, ``commit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from asyncpg import Record

from plugind.projections._db import Executor
from plugind.projections.read_models import short_plugin_id

MAX_EVENTS_LIMIT: Final = 1000
EVENT_LOG_CHECKPOINT: Final = "event_log"  # the projector's checkpoint


def rfc3339(value: datetime | None) -> str | None:
    """``2024-01-02T03:04:05.123456Z``, the format of every event's ``at``."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json(text: str | None) -> Any:
    return orjson.loads(text) if text is not None else None


@dataclass(frozen=True, slots=True)
class PluginRow:
    tenant_id: str
    plugin_id: str
    identifier: str
    version: str
    status: str
    manifest: Any
    installed_at: datetime
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "plugin_id": self.plugin_id,
            "identifier": self.identifier,
            "version": self.version,
            "status": self.status,
            "manifest": self.manifest,
            "installed_at": rfc3339(self.installed_at),
            "updated_at": rfc3339(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class TaskRow:
    request_id: str
    tenant_id: str
    plugin_id: str | None
    identifier: str | None
    access: str | None
    action: str | None
    status: str
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: float | None
    result: Any
    error: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "tenant_id": self.tenant_id,
            "plugin_id": self.plugin_id,
            "identifier": self.identifier,
            "access": self.access,
            "action": self.action,
            "status": self.status,
            "attempts": self.attempts,
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
            "duration_ms": self.duration_ms,
            "result": self.result,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class EventRow:
    position: int
    stream_id: str
    event_id: str | None
    type: str
    request_id: str | None
    tenant_id: str | None
    plugin_id: str | None
    at: datetime
    hash: bytes
    event: Any  # the stored event (for type ``unknown``: ``{"raw", "error"}``)

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "stream_id": self.stream_id,
            "event_id": self.event_id,
            "type": self.type,
            "request_id": self.request_id,
            "tenant_id": self.tenant_id,
            "plugin_id": self.plugin_id,
            "at": rfc3339(self.at),
            "hash": self.hash.hex(),
            "event": self.event,
        }


@dataclass(frozen=True, slots=True)
class EventPage:
    events: tuple[EventRow, ...]
    next: int | None  # pass as ``after`` for the next page; None on the last page

    def to_dict(self) -> dict[str, Any]:
        return {"events": [e.to_dict() for e in self.events], "next": self.next}


@dataclass(frozen=True, slots=True)
class Checkpoint:
    name: str
    stream: str | None
    last_stream_id: str | None
    last_position: int
    head_hash: bytes
    updated_at: datetime


async def list_plugins(
    conn: Executor, *, tenant_id: str | None = None, status: str | None = "installed"
) -> list[PluginRow]:
    """Plugins by tenant and id; ``status=None`` includes uninstalled ones."""
    rows = await conn.fetch(
        """
        SELECT tenant_id, plugin_id, identifier, version, status, manifest::text AS manifest,
               installed_at, updated_at
        FROM plugins
        WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::text IS NULL OR status = $2)
        ORDER BY tenant_id, plugin_id
        """,
        tenant_id,
        status,
    )
    return [PluginRow(**{**dict(r), "manifest": _json(r["manifest"])}) for r in rows]


async def count_plugins(conn: Executor, tenant_id: str, *, status: str = "installed") -> int:
    total = await conn.fetchval(
        "SELECT count(*) FROM plugins WHERE tenant_id = $1 AND status = $2", tenant_id, status
    )
    return int(total)


async def plugin_status(conn: Executor, tenant_id: str, plugin_id: str) -> str | None:
    """``installed``, ``uninstalled``, or None if the tenant never had ``plugin_id``."""
    status: str | None = await conn.fetchval(
        "SELECT status FROM plugins WHERE tenant_id = $1 AND plugin_id = $2", tenant_id, plugin_id
    )
    return status


@dataclass(frozen=True, slots=True)
class InstalledPackageRow:
    """An installed plugin with its package (from the package store) and, for the Dify API,
    where Dify said it came from (``dify_install_sources``; ``package`` when it did not say)."""

    tenant_id: str
    plugin_id: str
    identifier: str
    version: str
    installed_at: datetime
    updated_at: datetime
    sha256: str
    declaration: dict[str, Any]
    source: str
    meta: dict[str, Any]
    endpoints_setups: int = 0
    endpoints_active: int = 0


_INSTALLED_WITH_PACKAGES: Final = """
SELECT p.tenant_id, p.plugin_id, p.identifier, p.version, p.installed_at, p.updated_at,
       pkg.sha256, pkg.declaration, s.source, s.meta::text AS meta,
       ep.setups AS endpoints_setups, ep.active AS endpoints_active
FROM plugins p
JOIN LATERAL (
    SELECT sha256, declaration::text AS declaration FROM packages
    WHERE identifier = p.identifier ORDER BY created_at DESC LIMIT 1
) pkg ON true
LEFT JOIN dify_install_sources s ON s.tenant_id = p.tenant_id AND s.identifier = p.identifier
CROSS JOIN LATERAL (
    SELECT count(*) AS setups, count(*) FILTER (WHERE e.enabled) AS active FROM endpoints e
    WHERE e.tenant_id = p.tenant_id AND e.plugin_id = p.plugin_id
) ep
WHERE p.tenant_id = $1 AND p.status = 'installed'
"""


async def installed_with_packages(
    conn: Executor,
    tenant_id: str,
    *,
    plugin_ids: Sequence[str] | None = None,
    page: tuple[int, int] | None = None,
) -> list[InstalledPackageRow]:
    """The tenant's installed plugins, oldest install first (page ``(number, size)`` of them)."""
    sql, args = _INSTALLED_WITH_PACKAGES, [tenant_id]
    if plugin_ids is not None:
        sql += " AND p.plugin_id = ANY($2::text[])"
        args.append(list(plugin_ids))  # type: ignore[arg-type]
    sql += " ORDER BY p.installed_at, p.plugin_id"
    if page is not None:
        number, size = page
        sql += f" LIMIT {int(size)} OFFSET {int((number - 1) * size)}"
    rows = await conn.fetch(sql, *args)
    return [
        InstalledPackageRow(
            tenant_id=row["tenant_id"],
            plugin_id=row["plugin_id"],
            identifier=row["identifier"],
            version=row["version"],
            installed_at=row["installed_at"],
            updated_at=row["updated_at"],
            sha256=row["sha256"],
            declaration=orjson.loads(row["declaration"]),
            source=row["source"] or "package",
            meta=orjson.loads(row["meta"]) if row["meta"] else {},
            endpoints_setups=int(row["endpoints_setups"]),
            endpoints_active=int(row["endpoints_active"]),
        )
        for row in rows
    ]


async def get_task(conn: Executor, request_id: str) -> TaskRow | None:
    row = await conn.fetchrow(
        """
        SELECT request_id, tenant_id, plugin_id, identifier, access, action, status, attempts,
               created_at, started_at, finished_at, duration_ms,
               result::text AS result, error::text AS error
        FROM tasks WHERE request_id = $1
        """,
        request_id,
    )
    if row is None:
        return None
    return TaskRow(**{**dict(row), "result": _json(row["result"]), "error": _json(row["error"])})


async def query_events(
    conn: Executor,
    *,
    types: Sequence[str] | None = None,
    plugin_id: str | None = None,
    request_id: str | None = None,
    tenant_id: str | None = None,
    since: datetime | int | None = None,
    until: datetime | int | None = None,
    after: int | None = None,
    limit: int = 100,
) -> EventPage:
    """Events in log order matching every given filter, one page at a time.

    ``since``/``until`` are inclusive bounds, a time (on ``at``) or a position; ``after`` is the
    exclusive cursor returned as ``next`` by the previous page.
    """
    if not 1 <= limit <= MAX_EVENTS_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_EVENTS_LIMIT}")
    where: list[str] = []
    args: list[Any] = []

    def add(sql: str, value: Any) -> None:
        args.append(value)
        where.append(sql.format(f"${len(args)}"))

    if types:
        add("type = ANY({}::text[])", list(types))
    if plugin_id is not None:
        add("plugin_id = {}", short_plugin_id(plugin_id))
    if request_id is not None:
        add("request_id = {}", request_id)
    if tenant_id is not None:
        add("tenant_id = {}", tenant_id)
    for bound, op in ((since, ">="), (until, "<=")):
        if isinstance(bound, datetime):
            add(f"at {op} {{}}", bound)
        elif bound is not None:
            add(f"position {op} {{}}", bound)
    if after is not None:
        add("position > {}", after)
    args.append(limit + 1)
    sql = f"""
        SELECT {_EVENT_COLUMNS}
        FROM event_log {"WHERE " + " AND ".join(where) if where else ""}
        ORDER BY position LIMIT ${len(args)}
    """
    rows = await conn.fetch(sql, *args)
    events = tuple(_event_row(r) for r in rows[:limit])
    return EventPage(events, events[-1].position if len(rows) > limit else None)


async def events_of_requests(
    conn: Executor, request_ids: Sequence[str], *, types: Sequence[str]
) -> list[EventRow]:
    """The events of these types of all these requests, in log order (no paging: a few
    requests' events)."""
    rows = await conn.fetch(
        f"SELECT {_EVENT_COLUMNS} FROM event_log"
        " WHERE request_id = ANY($1::text[]) AND type = ANY($2::text[]) ORDER BY position",
        list(request_ids),
        list(types),
    )
    return [_event_row(r) for r in rows]


_EVENT_COLUMNS: Final = (
    "position, stream_id, event_id, type, request_id, tenant_id, plugin_id, at, hash, "
    "payload::text AS payload"
)


def _event_row(r: Record) -> EventRow:
    return EventRow(
        position=r["position"],
        stream_id=r["stream_id"],
        event_id=r["event_id"],
        type=r["type"],
        request_id=r["request_id"],
        tenant_id=r["tenant_id"],
        plugin_id=r["plugin_id"],
        at=r["at"],
        hash=bytes(r["hash"]),
        event=orjson.loads(r["payload"]),
    )


_CHECKPOINT_COLUMNS: Final = "name, stream, last_stream_id, last_position, head_hash, updated_at"


def _checkpoint(row: Record) -> Checkpoint:
    return Checkpoint(**{**dict(row), "head_hash": bytes(row["head_hash"])})


async def get_checkpoint(
    conn: Executor, name: str = EVENT_LOG_CHECKPOINT, *, for_update: bool = False
) -> Checkpoint | None:
    """A projection's checkpoint; ``for_update`` locks its row until the transaction ends."""
    row = await conn.fetchrow(
        f"SELECT {_CHECKPOINT_COLUMNS} FROM projection_checkpoints WHERE name = $1"
        + (" FOR UPDATE" if for_update else ""),
        name,
    )
    return _checkpoint(row) if row is not None else None


async def list_checkpoints(conn: Executor) -> list[Checkpoint]:
    rows = await conn.fetch(
        f"SELECT {_CHECKPOINT_COLUMNS} FROM projection_checkpoints ORDER BY name"
    )
    return [_checkpoint(r) for r in rows]


async def logged_event_ids(conn: Executor, event_ids: Sequence[str]) -> set[str]:
    """Which of ``event_ids`` the event log already holds."""
    rows = await conn.fetch(
        "SELECT event_id FROM event_log WHERE event_id = ANY($1::text[])", list(event_ids)
    )
    return {r["event_id"] for r in rows}


async def count_by_status(conn: Executor, table: str) -> dict[str, int]:
    """Rows of ``tasks`` or ``plugins`` per status (for metrics)."""
    if table not in ("tasks", "plugins"):
        raise ValueError(f"no status counts for table {table!r}")
    rows = await conn.fetch(f"SELECT status, count(*) AS n FROM {table} GROUP BY status")
    return {r["status"]: int(r["n"]) for r in rows}
