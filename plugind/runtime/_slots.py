"""The pool's record of each plugin: its slots, and what ran in each.

A slot holds at most one process at a time and remembers, across the processes that come and
go in it, how many started and how many failed in a row: the numbers the restart backoff and
``PluginPool.snapshot`` are made of.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anyio

from plugind.errors import PlugindError
from plugind.runtime.process import PluginProcess


@dataclass(eq=False)
class Slot:
    index: int
    process: PluginProcess | None = None
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    attempts: int = 0  # spawns; a waiter compares it to share the failure of a start
    started: int = 0  # processes that became ready
    failures: int = 0  # consecutive crashes and failed starts
    next_start_at: float = 0.0  # time.monotonic() before which no spawn is attempted
    counted: bool = True  # the current process's readiness is in `started`
    exit_recorded: bool = True  # the current process's exit is in `failures`
    last_error: PlugindError | None = None

    @property
    def starting(self) -> bool:
        return self.lock.locked() or (self.process is not None and self.process.starting)

    @property
    def free(self) -> bool:
        """No process running or starting here: a new one may be spawned (after backoff)."""
        return not self.starting and not (self.process is not None and self.process.alive)


@dataclass(eq=False)
class Group:
    identifier: str
    workdir: Path
    python: Path
    entrypoint: str
    slots: list[Slot]
    restarts: int = 0
    closed: bool = False

    def live(self) -> list[PluginProcess]:
        return [s.process for s in self.slots if s.process is not None and s.process.alive]
