"""The plugin processes of this node: up to ``instances`` per installed plugin.

Processes start lazily, on first use. A request goes to an idle live process when there is
one; when all are busy and a slot is free another process is started (one SDK process runs on
one core, since the SDK is single-threaded under gevent); otherwise it goes to the least loaded.
A process that crashed is replaced on next use, after an exponential backoff (0.5 s doubling to
30 s; reset once a process has stayed up for a minute), so a plugin that dies at every request
cannot turn the node into a fork loop. Callers that need the same process share its start.

No background task is involved: the pool acts inside its callers' tasks, and each process's
reader is a thread owned by that process (see :mod:`plugind.runtime.process`). So the pool
needs no task group of its own; :meth:`PluginPool.aclose` stops everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import anyio

from plugind.errors import PlugindError
from plugind.runtime.process import ChunkCallback, PluginProcess, PluginRequest

log = logging.getLogger("plugind.runtime")

DEFAULT_MAX_RESULT = 16 * 1024 * 1024
_LINE_SLACK = 1024 * 1024  # the envelope of a stream line around its data


class ProcessStats(NamedTuple):
    slot: int
    pid: int | None
    alive: bool
    in_flight: int
    uptime_s: float | None
    heartbeat_age_s: float | None


class PluginStats(NamedTuple):
    identifier: str
    processes: tuple[ProcessStats, ...]
    in_flight: int
    restarts: int
    consecutive_failures: int


class PoolSnapshot(NamedTuple):
    """Immutable numbers behind ``/health`` and ``plugind status``."""

    plugins: tuple[PluginStats, ...]
    processes: int
    in_flight: int
    restarts: int


@dataclass(eq=False)
class _Slot:
    index: int
    process: PluginProcess | None = None
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    starting: bool = False
    attempts: int = 0  # start attempts; waiters compare it to share a failed start
    started: int = 0  # successful starts
    failures: int = 0  # consecutive crashes or failed starts
    next_start_at: float = 0.0  # time.monotonic() before which no start is attempted
    crash_recorded: bool = True
    last_error: PlugindError | None = None


@dataclass(eq=False)
class _Group:
    identifier: str
    workdir: Path
    python: Path
    entrypoint: str
    slots: list[_Slot]
    restarts: int = 0
    closed: bool = False

    def live(self) -> list[PluginProcess]:
        return [s.process for s in self.slots if s.process is not None and s.process.alive]


class PluginPool:
    """Plugin processes keyed by unique identifier; see the module docstring."""

    def __init__(
        self,
        *,
        instances: int = 1,
        base_env: Mapping[str, str] | None = None,
        ready_timeout: float = 60,
        max_result_size: int = DEFAULT_MAX_RESULT,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        healthy_after: float = 60.0,
        kill_grace: float = 3.0,
    ) -> None:
        if instances < 1:
            raise ValueError("instances must be at least 1")
        self.instances = instances
        self.base_env = dict(base_env or {})
        self.ready_timeout = ready_timeout
        self.max_result_size = max_result_size
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.healthy_after = healthy_after
        self.kill_grace = kill_grace
        self._groups: dict[str, _Group] = {}
        self._closed = False

    # ------------------------------------------------------------------ public

    async def start(self, identifier: str, workdir: Path, venv_python: Path, entrypoint: str) -> None:
        """Make sure ``identifier`` has a running process (install's launch step).

        An explicit start does not wait out a crash backoff. Raises ``plugin_start_failed``.
        """
        group = self._group(identifier, workdir, venv_python, entrypoint)
        if group.live():
            return
        deadline = time.monotonic() + self.ready_timeout + self.kill_grace
        await self._start_slot(group, group.slots[0], deadline, wait_backoff=False)

    async def invoke(
        self,
        identifier: str,
        workdir: Path,
        venv_python: Path,
        entrypoint: str,
        request: PluginRequest,
        *,
        timeout: float,
        on_chunk: ChunkCallback | None = None,
    ) -> list[Any]:
        """Run ``request`` on a process of ``identifier``, starting one if needed.

        ``timeout`` covers everything, a process start included. Raises the errors of
        :meth:`PluginProcess.invoke`, and ``plugin_start_failed`` when no process will start.
        """
        deadline = time.monotonic() + timeout
        group = self._group(identifier, workdir, venv_python, entrypoint)
        process = await self._acquire(group, deadline)
        return await process.invoke(
            request,
            timeout=max(deadline - time.monotonic(), 0.001),
            on_chunk=on_chunk,
            max_result_size=self.max_result_size,
        )

    async def stop(self, identifier: str) -> None:
        """Stop every process of ``identifier`` (uninstall, upgrade)."""
        group = self._groups.pop(identifier, None)
        if group is not None:
            await self._close_group(group)

    async def aclose(self) -> None:
        """Stop everything (daemon shutdown); later calls raise ``plugin_start_failed``."""
        self._closed = True
        groups = list(self._groups.values())
        self._groups.clear()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for group in groups:
                    tg.start_soon(self._close_group, group)

    def snapshot(self) -> PoolSnapshot:
        now = time.monotonic()
        plugins: list[PluginStats] = []
        for group in self._groups.values():
            stats: list[ProcessStats] = []
            for slot in group.slots:
                proc = slot.process
                if proc is None:
                    continue
                stats.append(
                    ProcessStats(
                        slot=slot.index,
                        pid=proc.pid,
                        alive=proc.alive,
                        in_flight=proc.in_flight,
                        uptime_s=now - proc.started_at if proc.started_at and proc.alive else None,
                        heartbeat_age_s=now - proc.last_heartbeat if proc.last_heartbeat else None,
                    )
                )
            plugins.append(
                PluginStats(
                    identifier=group.identifier,
                    processes=tuple(stats),
                    in_flight=sum(s.in_flight for s in stats),
                    restarts=group.restarts,
                    consecutive_failures=max((s.failures for s in group.slots), default=0),
                )
            )
        return PoolSnapshot(
            plugins=tuple(plugins),
            processes=sum(1 for p in plugins for s in p.processes if s.alive),
            in_flight=sum(p.in_flight for p in plugins),
            restarts=sum(p.restarts for p in plugins),
        )

    # ------------------------------------------------------------------ internals

    def _group(self, identifier: str, workdir: Path, python: Path, entrypoint: str) -> _Group:
        if self._closed:
            raise PlugindError("plugin_start_failed", "the plugin pool is shutting down")
        group = self._groups.get(identifier)
        if group is None:
            slots = [_Slot(index=i) for i in range(self.instances)]
            group = _Group(identifier, Path(workdir), Path(python), entrypoint, slots)
            self._groups[identifier] = group
        else:  # a rebuilt environment applies to processes started from now on
            group.workdir, group.python, group.entrypoint = Path(workdir), Path(python), entrypoint
        return group

    async def _acquire(self, group: _Group, deadline: float) -> PluginProcess:
        live = group.live()
        idle = [p for p in live if p.in_flight == 0]
        if idle:
            return idle[0]
        free = [s for s in group.slots if not s.starting and not (s.process and s.process.alive)]
        if live:
            # All busy: grow towards `instances` if a slot may start now, else share the load.
            now = time.monotonic()
            due = [s for s in free if self._due(s) <= now]
            if due:
                try:
                    return await self._start_slot(group, due[0], deadline, wait_backoff=False)
                except PlugindError as exc:
                    live = group.live()
                    if exc.code == "timeout" or not live:
                        raise
            return min(live, key=lambda p: p.in_flight)
        starting = [s for s in group.slots if s.starting]
        slot = starting[0] if starting else min(free, key=self._due)
        return await self._start_slot(group, slot, deadline, wait_backoff=True)

    def _due(self, slot: _Slot) -> float:
        """When ``slot`` may start again, recording the crash of its process first."""
        proc = slot.process
        if proc is not None and proc.exited_at is not None and not slot.crash_recorded:
            slot.crash_recorded = True
            uptime = proc.exited_at - (proc.started_at or proc.exited_at)
            slot.failures = 1 if uptime >= self.healthy_after else slot.failures + 1
            slot.next_start_at = proc.exited_at + self._backoff(slot.failures)
        return slot.next_start_at

    def _backoff(self, failures: int) -> float:
        return float(min(self.backoff_initial * 2 ** max(failures - 1, 0), self.backoff_max))

    async def _start_slot(
        self, group: _Group, slot: _Slot, deadline: float, *, wait_backoff: bool
    ) -> PluginProcess:
        attempts = slot.attempts
        async with slot.lock:
            proc = slot.process
            if proc is not None and proc.alive:
                return proc  # another caller started it while we waited
            if slot.attempts != attempts and slot.last_error is not None:
                raise slot.last_error  # the start we waited for failed: share its error
            if proc is not None:
                self._due(slot)
                await proc.aclose()
                slot.process = None
            wait = slot.next_start_at - time.monotonic()
            if wait_backoff and wait > 0:
                if time.monotonic() + wait >= deadline:
                    raise PlugindError(
                        "plugin_crashed",
                        f"{group.identifier} failed {slot.failures} time(s) in a row; "
                        f"next start in {wait:.1f}s",
                    )
                await anyio.sleep(wait)
            slot.starting = True
            slot.attempts += 1
            slot.last_error = None
            try:
                proc = await self._spawn(group, deadline)
            except PlugindError as exc:
                if exc.code != "timeout":  # the caller's deadline is not the plugin's fault
                    slot.failures += 1
                    slot.next_start_at = time.monotonic() + self._backoff(slot.failures)
                    slot.last_error = exc
                raise
            finally:
                slot.starting = False
            slot.process = proc
            slot.crash_recorded = False
            slot.started += 1
            if slot.started > 1:
                group.restarts += 1
            return proc

    async def _spawn(self, group: _Group, deadline: float) -> PluginProcess:
        proc = PluginProcess(
            group.identifier,
            group.workdir,
            group.python,
            group.entrypoint,
            env=self.base_env,
            max_line_size=self.max_result_size + _LINE_SLACK,
            kill_grace=self.kill_grace,
        )
        budget = deadline - time.monotonic()
        with anyio.move_on_after(max(budget, 0)) as scope:
            await proc.start(self.ready_timeout)
        if scope.cancelled_caught:
            raise PlugindError(
                "timeout",
                f"{group.identifier} was still starting when the task's time ran out",
            )
        if group.closed:
            await proc.aclose()
            raise PlugindError(
                "plugin_start_failed", f"{group.identifier} was stopped while it was starting"
            )
        return proc

    async def _close_group(self, group: _Group) -> None:
        group.closed = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for slot in group.slots:
                    if slot.process is not None:
                        tg.start_soon(slot.process.aclose)
