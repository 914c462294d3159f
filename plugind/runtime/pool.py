"""The plugin processes of this node: up to ``instances`` per installed plugin.

Processes start lazily, on first use, and callers that need the same process share its start.
A request goes to an idle live process when there is one. When all are busy, it goes to the
least loaded one, and if a slot is free another process is spawned for the requests after it
(an SDK process is single-threaded under gevent, so one process is one core). A process that
crashed is replaced on next use, after an exponential backoff (0.5 s doubling to 30 s, back to
the start once a process has stayed up for a minute), so a plugin that dies at every request
cannot turn the node into a fork loop. A process whose memory goes over its plugin's limit, or
that stops sending heartbeats for ``heartbeat_timeout``, is killed and counts as a crash (see
:mod:`plugind.runtime.memory`); it is replaced on next use.

No background task is involved: the pool acts inside its callers' tasks, each process's reader
is a thread owned by that process (see :mod:`plugind.runtime.process`), and one memory watchdog
thread runs while there are processes. That is also why a start outlives the caller that began
it: a process keeps starting after its first caller's deadline, and the next caller finds it
ready. Bookkeeping (starts, crashes, backoff) is brought up to date whenever the pool looks at a
slot. :meth:`PluginPool.aclose` stops all.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import anyio

from plugind.errors import PlugindError, TimedOut
from plugind.runtime._slots import Group, Slot
from plugind.runtime.backwards import Backwards
from plugind.runtime.memory import MemoryWatchdog, memory_limit
from plugind.runtime.process import ChunkCallback, PluginProcess, PluginRequest

log = logging.getLogger(__name__)

DEFAULT_MAX_RESULT = 16 * 1024 * 1024
_LINE_SLACK = 1024 * 1024  # the envelope of a stream line around its data


class ProcessStats(NamedTuple):
    slot: int
    pid: int | None
    alive: bool
    in_flight: int
    uptime_s: float | None
    heartbeat_age_s: float | None
    rss: int | None  # bytes, whole process group, last sample
    memory_limit: int | None  # bytes


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
        memory_limit: int | None = None,
        memory_interval: float = 0.5,
        heartbeat_timeout: float | None = None,
    ) -> None:
        if instances < 1:
            raise ValueError("instances must be at least 1")
        if memory_limit is not None and memory_limit <= 0:
            raise ValueError("memory_limit must be a positive number of bytes")
        self.instances = instances
        self.base_env = dict(base_env or {})
        self.ready_timeout = ready_timeout
        self.max_result_size = max_result_size
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.healthy_after = healthy_after
        self.kill_grace = kill_grace
        self.memory_limit = memory_limit  # default and cap of the manifests' resource.memory
        self._groups: dict[str, Group] = {}
        self._limits: dict[str, int | None] = {}  # by identifier, read from the manifest once
        self._watchdog = MemoryWatchdog(
            interval=memory_interval, heartbeat_timeout=heartbeat_timeout
        )
        self._closed = False

    # ------------------------------------------------------------------ public

    async def start(
        self, identifier: str, workdir: Path, venv_python: Path, entrypoint: str
    ) -> None:
        """Make sure ``identifier`` has a running process (install's launch step).

        An explicit start does not wait out a crash backoff. Raises ``plugin_start_failed``.
        """
        group = self._group(identifier, workdir, venv_python, entrypoint)
        self._account(group)
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
        backwards: Backwards | None = None,
    ) -> list[Any]:
        """Run ``request`` on a process of ``identifier``, starting one if needed.

        ``timeout`` covers everything, waiting for a start included. Raises the errors of
        :meth:`PluginProcess.invoke`, ``plugin_start_failed`` when the process will not start,
        and ``plugin_crashed`` when it keeps crashing and its next start is after the deadline.
        """
        deadline = time.monotonic() + timeout
        group = self._group(identifier, workdir, venv_python, entrypoint)
        process = await self._acquire(group, deadline)
        return await process.invoke(
            request,
            timeout=max(deadline - time.monotonic(), 0.001),
            on_chunk=on_chunk,
            max_result_size=self.max_result_size,
            backwards=backwards,
        )

    async def stop(self, identifier: str) -> None:
        """Stop every process of ``identifier`` (uninstall, upgrade)."""
        group = self._groups.pop(identifier, None)
        self._limits.pop(identifier, None)
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
            await self._watchdog.aclose()

    def snapshot(self) -> PoolSnapshot:
        now = time.monotonic()
        plugins: list[PluginStats] = []
        for group in self._groups.values():
            self._account(group)
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
                        rss=self._watchdog.rss(proc),
                        memory_limit=self._limits.get(group.identifier),
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

    # ------------------------------------------------------------------ choosing a process

    def _group(self, identifier: str, workdir: Path, python: Path, entrypoint: str) -> Group:
        if self._closed:
            raise PlugindError("plugin_start_failed", "the plugin pool is shutting down")
        group = self._groups.get(identifier)
        if group is None:
            slots = [Slot(index=i) for i in range(self.instances)]
            group = Group(identifier, Path(workdir), Path(python), entrypoint, slots)
            self._groups[identifier] = group
            self._limits[identifier] = memory_limit(identifier, Path(workdir), self.memory_limit)
        else:  # a rebuilt environment applies to processes started from now on
            group.workdir, group.python, group.entrypoint = Path(workdir), Path(python), entrypoint
        return group

    async def _acquire(self, group: Group, deadline: float) -> PluginProcess:
        self._account(group, enforce=True)
        live = group.live()
        idle = [p for p in live if p.in_flight == 0]
        if idle:
            return idle[0]
        if live:
            await self._grow(group)
            return min(live, key=lambda p: p.in_flight)
        starting = [s for s in group.slots if s.starting]
        slot = starting[0] if starting else min(group.slots, key=lambda s: s.next_start_at)
        return await self._start_slot(group, slot, deadline, wait_backoff=True)

    async def _grow(self, group: Group) -> None:
        """All live processes are busy: spawn one more in a free slot, without waiting for it."""
        now = time.monotonic()
        for slot in group.slots:
            if slot.free and slot.next_start_at <= now:
                async with slot.lock:
                    if slot.process is not None and (slot.process.alive or slot.process.starting):
                        return  # someone else got there first
                    await self._clear(slot)
                    with contextlib.suppress(PlugindError):  # recorded; the busy ones serve
                        self._spawn(group, slot)
                return

    # ------------------------------------------------------------------ starting

    async def _start_slot(
        self, group: Group, slot: Slot, deadline: float, *, wait_backoff: bool
    ) -> PluginProcess:
        """A ready process in ``slot``: the one there, the one starting there, or a new one."""
        attempts = slot.attempts
        async with slot.lock:
            self._account(group)
            proc = slot.process
            if proc is not None and proc.alive:
                return proc
            if slot.attempts != attempts and slot.last_error is not None:
                raise slot.last_error  # the start we waited for failed: share its error
            if proc is None or not proc.starting:
                await self._clear(slot)
                await self._wait_backoff(group, slot, deadline, wait_backoff)
                proc = self._spawn(group, slot)
            return await self._await_ready(group, slot, proc, deadline)

    async def _clear(self, slot: Slot) -> None:
        """Dispose of the slot's dead process (its exit is already accounted for)."""
        if slot.process is not None and not slot.process.alive and not slot.process.starting:
            await slot.process.aclose()
            slot.process = None

    async def _wait_backoff(
        self, group: Group, slot: Slot, deadline: float, wait_backoff: bool
    ) -> None:
        wait = slot.next_start_at - time.monotonic()
        if not wait_backoff or wait <= 0:
            return
        if time.monotonic() + wait >= deadline:
            raise PlugindError(
                "plugin_crashed",
                f"{group.identifier} failed {slot.failures} time(s) in a row; "
                f"next start in {wait:.1f}s",
            )
        await anyio.sleep(wait)

    def _spawn(self, group: Group, slot: Slot) -> PluginProcess:
        slot.attempts += 1
        slot.last_error = None
        proc = PluginProcess(
            group.identifier,
            group.workdir,
            group.python,
            group.entrypoint,
            env=self.base_env,
            max_line_size=self.max_result_size + _LINE_SLACK,
            kill_grace=self.kill_grace,
        )
        try:
            proc.spawn()
        except PlugindError as exc:
            self._count_failure(slot, exc, time.monotonic())
            raise
        slot.process, slot.counted, slot.exit_recorded = proc, False, False
        self._watchdog.watch(proc, self._limits.get(group.identifier, self.memory_limit))
        return proc

    async def _await_ready(
        self, group: Group, slot: Slot, proc: PluginProcess, deadline: float
    ) -> PluginProcess:
        ready_by = (proc.started_at or time.monotonic()) + self.ready_timeout
        try:
            ready = await proc.wait_ready(min(deadline, ready_by) - time.monotonic())
        except PlugindError as exc:
            if not slot.exit_recorded:
                slot.exit_recorded = True
                self._count_failure(slot, exc, proc.exited_at or time.monotonic())
            await proc.aclose()
            raise
        if not ready:
            if time.monotonic() < ready_by:
                raise TimedOut(f"{group.identifier} was still starting when the time ran out")
            error = proc.no_heartbeat_error(self.ready_timeout)
            slot.exit_recorded = True
            self._count_failure(slot, error, time.monotonic())
            await proc.aclose()
            raise error
        if group.closed:
            await proc.aclose()
            raise PlugindError(
                "plugin_start_failed", f"{group.identifier} was stopped while it was starting"
            )
        self._account(group)
        return proc

    # ------------------------------------------------------------------ bookkeeping

    def _account(self, group: Group, *, enforce: bool = False) -> None:
        """Count starts and exits that happened since the pool last looked.

        With ``enforce``, a process that has been starting for longer than ``ready_timeout``
        with nobody waiting for it is killed; its exit is counted as a failed start next time.
        """
        now = time.monotonic()
        for slot in group.slots:
            proc = slot.process
            if proc is None:
                continue
            if proc.became_ready and not slot.counted:
                slot.counted = True
                slot.started += 1
                slot.last_error = None
                if slot.started > 1:
                    group.restarts += 1
            if proc.exited_at is not None and not slot.exit_recorded:
                slot.exit_recorded = True
                if proc.became_ready:
                    uptime = proc.exited_at - (proc.started_at or proc.exited_at)
                    slot.failures = 1 if uptime >= self.healthy_after else slot.failures + 1
                    slot.next_start_at = proc.exited_at + self._backoff(slot.failures)
                    log.info(
                        "Plugin %s crashed after %.1fs up (%d in a row); next start in %.1fs",
                        group.identifier,
                        uptime,
                        slot.failures,
                        max(slot.next_start_at - now, 0),
                    )
                else:
                    self._count_failure(slot, proc.exit_error(), proc.exited_at)
            elif (
                enforce
                and proc.starting
                and not slot.lock.locked()
                and now >= (proc.started_at or now) + self.ready_timeout
            ):
                proc.kill(f"no heartbeat within {self.ready_timeout:g}s")

    def _count_failure(self, slot: Slot, error: PlugindError, at: float) -> None:
        slot.failures += 1
        slot.next_start_at = at + self._backoff(slot.failures)
        slot.last_error = error

    def _backoff(self, failures: int) -> float:
        return float(min(self.backoff_initial * 2 ** max(failures - 1, 0), self.backoff_max))

    async def _close_group(self, group: Group) -> None:
        group.closed = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for slot in group.slots:
                    if slot.process is not None:
                        tg.start_soon(slot.process.aclose)
