"""Dify's install tasks: what the console polls while plugins install.

A task is one row of ``dify_install_tasks``: its id, tenant and the plugins it installs, each
with the request id of its install command (``<task id>:<n>``). Its status is never stored: it
is folded, on every read, from those requests' events in the event log, so it says exactly
what the log says. The projector writes an install's terminal event and the ``plugins`` row in
one transaction, so a task that reads ``success`` is already in ``management/list``.

Labels and icons come from the package's declaration in the package store.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from plugind.dify import declarations
from plugind.dify.shapes import InstallTask, InstallTaskPlugin
from plugind.projections._db import Conn, Executor
from plugind.projections.package_store import package_looks
from plugind.projections.queries import events_of_requests, rfc3339

_FAILED_TYPES: Final = ("plugin.install_failed", "command.rejected", "command.dead_lettered")
_EVENT_TYPES: Final = (
    "plugin.install_started",
    "plugin.install_progress",
    "plugin.installed",
    *_FAILED_TYPES,
)


@dataclass(frozen=True, slots=True)
class TaskItem:
    identifier: str
    plugin_id: str
    request_id: str | None  # None: already installed when the task was made, nothing to run
    sha256: str | None
    source: str
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "identifier": self.identifier,
            "plugin_id": self.plugin_id,
            "request_id": self.request_id,
            "sha256": self.sha256,
            "source": self.source,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TaskItem:
        return cls(
            identifier=str(raw.get("identifier", "")),
            plugin_id=str(raw.get("plugin_id", "")),
            request_id=raw.get("request_id"),
            sha256=raw.get("sha256"),
            source=str(raw.get("source") or "package"),
            meta=raw.get("meta") or {},
        )


def new_task_id() -> str:
    return str(uuid.uuid4())


def request_id_for(task_id: str, index: int) -> str:
    return f"{task_id}:{index}"


async def create_task(db: Executor, task_id: str, tenant_id: str, items: list[TaskItem]) -> None:
    await db.execute(
        "INSERT INTO dify_install_tasks (id, tenant_id, plugins) VALUES ($1, $2, $3::text::jsonb)",
        task_id,
        tenant_id,
        orjson.dumps([item.to_json() for item in items]).decode(),
    )


async def get_task(conn: Conn, tenant_id: str, task_id: str) -> InstallTask | None:
    row = await conn.fetchrow(
        "SELECT id, tenant_id, created_at, plugins::text AS plugins FROM dify_install_tasks "
        "WHERE tenant_id = $1 AND id = $2",
        tenant_id,
        task_id,
    )
    if row is None:
        return None
    return (await _fold(conn, [row]))[0]


async def list_tasks(conn: Conn, tenant_id: str, page: int, page_size: int) -> list[InstallTask]:
    rows = await conn.fetch(
        "SELECT id, tenant_id, created_at, plugins::text AS plugins FROM dify_install_tasks "
        "WHERE tenant_id = $1 ORDER BY created_at DESC, id LIMIT $2 OFFSET $3",
        tenant_id,
        page_size,
        (page - 1) * page_size,
    )
    return await _fold(conn, list(rows))


async def delete_task(db: Executor, tenant_id: str, task_id: str) -> None:
    await db.execute(
        "DELETE FROM dify_install_tasks WHERE tenant_id = $1 AND id = $2", tenant_id, task_id
    )


async def delete_all_tasks(db: Executor, tenant_id: str) -> None:
    await db.execute("DELETE FROM dify_install_tasks WHERE tenant_id = $1", tenant_id)


async def delete_task_item(conn: Conn, tenant_id: str, task_id: str, identifier: str) -> None:
    """Drop one plugin from a task; a task whose remaining plugins all succeeded goes entirely."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT id, tenant_id, created_at, plugins::text AS plugins FROM dify_install_tasks "
            "WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
            tenant_id,
            task_id,
        )
        if row is None:
            return
        task = (await _fold(conn, [row]))[0]
        kept = [raw for raw in orjson.loads(row["plugins"]) if raw.get("identifier") != identifier]
        remaining = [p for p in task.plugins if p.plugin_unique_identifier != identifier]
        if all(p.status == "success" for p in remaining):
            await delete_task(conn, tenant_id, task_id)
            return
        await conn.execute(
            "UPDATE dify_install_tasks SET plugins = $3::text::jsonb "
            "WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            task_id,
            orjson.dumps(kept).decode(),
        )


@dataclass(slots=True)
class _Progress:
    status: str = "pending"
    message: str = ""
    at: datetime | None = None


async def _fold(conn: Conn, rows: list[Any]) -> list[InstallTask]:
    """Each task row with its plugins' statuses folded from the event log."""
    tasks = [
        (row, [TaskItem.from_json(raw) for raw in orjson.loads(row["plugins"])]) for row in rows
    ]
    request_ids = [i.request_id for _, items in tasks for i in items if i.request_id]
    progress: dict[str, _Progress] = {rid: _Progress() for rid in request_ids}
    if request_ids:
        for event in await events_of_requests(conn, request_ids, types=_EVENT_TYPES):
            state = progress[event.request_id or ""]
            if state.status in ("success", "failed"):
                continue  # the first terminal event is the one that counts
            state.at = event.at
            kind = event.type
            if kind == "plugin.installed":
                state.status, state.message = "success", "installed"
            elif kind in _FAILED_TYPES:
                error = event.event.get("error")
                message = error.get("message") if isinstance(error, dict) else None
                state.status, state.message = "failed", str(message or kind)
            else:
                state.status, state.message = (
                    "running",
                    str(event.event.get("message") or "installing"),
                )
    looks = await _looks(conn, [i.sha256 for _, items in tasks for i in items if i.sha256])
    out: list[InstallTask] = []
    for row, items in tasks:
        plugins: list[InstallTaskPlugin] = []
        updated: datetime = row["created_at"]
        for item in items:
            state = progress.get(item.request_id or "") or _Progress("success", "already installed")
            if state.at is not None and state.at > updated:
                updated = state.at
            label, icon, icon_dark = looks.get(
                item.sha256 or "", ({"en_US": item.plugin_id}, "", "")
            )
            plugins.append(
                InstallTaskPlugin(
                    plugin_unique_identifier=item.identifier,
                    plugin_id=item.plugin_id,
                    status=state.status,  # type: ignore[arg-type]
                    message=state.message,
                    icon=icon,
                    icon_dark=icon_dark,
                    labels=label,
                    source=item.source,
                )
            )
        statuses = {p.status for p in plugins}
        if statuses & {"pending", "running"}:
            status = "running"
        elif "failed" in statuses:
            status = "failed"
        else:
            status = "success"
        out.append(
            InstallTask(
                id=row["id"],
                created_at=_time(row["created_at"]),
                updated_at=_time(updated),
                tenant_id=row["tenant_id"],
                status=status,  # type: ignore[arg-type]
                total_plugins=len(plugins),
                completed_plugins=sum(p.status in ("success", "failed") for p in plugins),
                plugins=plugins,
            )
        )
    return out


async def _looks(conn: Conn, sha256s: list[str]) -> dict[str, tuple[dict[str, Any], str, str]]:
    """label, icon (asset id) and dark icon of each package, from its declaration."""
    if not sha256s:
        return {}
    looks: dict[str, tuple[dict[str, Any], str, str]] = {}
    for sha, found in (await package_looks(conn, sha256s)).items():
        label = found.label if found.label is not None else {}
        icon = declarations.asset_id(sha, found.icon) if found.icon else ""
        dark = declarations.asset_id(sha, found.icon_dark) if found.icon_dark else ""
        looks[sha] = (label if isinstance(label, dict) else {"en_US": str(label)}, icon, dark)
    return looks


def _time(value: datetime) -> str:
    return rfc3339(value) or datetime.now(UTC).isoformat()
