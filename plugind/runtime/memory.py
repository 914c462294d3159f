"""Memory limits of plugin processes.

A plugin's limit is the ``resource.memory`` of its manifest (bytes), else the pool's default,
and never more than the pool's cap (the same number). It applies to RSS summed over the
plugin's process group, so whatever the plugin spawns counts too. RLIMIT_AS is no use here: the
address space of a Python process running gevent is far larger than what it uses, so a limit
on it would kill healthy plugins.

One thread per pool samples every watched group each ``interval`` (a single pass over the
process table covers them all) and SIGKILLs a group that is over its limit, or whose process has
sent no heartbeat for ``heartbeat_timeout`` seconds once it was ready (a hung or frozen plugin;
the SDK beats every 10 s, and Dify's daemon gives up after 120 s, as here by default). The
sessions in flight on that process then fail with ``plugin_crashed`` saying so, and the pool
replaces the process on next use, after its usual backoff. The thread runs only while there is
a process to watch: it starts with the first one and ends when the last has exited or the pool
closes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import psutil  # type: ignore[import-untyped]

from plugind.errors import PlugindError
from plugind.package import parse_yaml
from plugind.runtime.process import PluginProcess

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def mib(size: int) -> str:
    return f"{size / MIB:.0f} MiB"


def manifest_memory(workdir: Path) -> int | None:
    """``resource.memory`` of the manifest in ``workdir``; ``None`` if it has none."""
    path = Path(workdir) / "manifest.yaml"
    try:
        manifest = parse_yaml(path.read_bytes(), "manifest.yaml")
    except (OSError, PlugindError) as exc:
        log.warning("Cannot read the memory limit in %s: %s", path, exc)
        return None
    resource = manifest.get("resource") if isinstance(manifest, dict) else None
    memory = resource.get("memory") if isinstance(resource, dict) else None
    if isinstance(memory, int) and not isinstance(memory, bool) and memory > 0:
        return memory
    return None


def memory_limit(identifier: str, workdir: Path, pool_limit: int | None) -> int | None:
    """The limit of a plugin: its manifest's, capped at ``pool_limit``, else ``pool_limit``.

    Without a pool limit nothing is enforced, manifest or not: Dify's own local runtime does
    not enforce ``resource.memory``, and real plugins often understate it, so holding them to
    it by default would break packages that run on Dify. Limits are the operator's choice.
    """
    if pool_limit is None:
        return None
    wanted = manifest_memory(workdir)
    if wanted is None:
        return pool_limit
    if pool_limit is not None and wanted > pool_limit:
        log.warning(
            "Plugin %s asks for %s of memory; it gets the node's cap of %s",
            identifier,
            mib(wanted),
            mib(pool_limit),
        )
        return pool_limit
    return wanted


def group_rss(pgids: Collection[int]) -> dict[int, int]:
    """The RSS in bytes of each process group in ``pgids``: the sum over its members."""
    totals = dict.fromkeys(pgids, 0)
    for pid in psutil.pids():
        try:
            pgid = os.getpgid(pid)
            if pgid in totals:
                totals[pgid] += psutil.Process(pid).memory_info().rss
        except (OSError, psutil.Error):
            continue  # it exited meanwhile
    return totals


@dataclass(eq=False)
class _Watch:
    limit: int | None
    rss: int | None = None
    killed: bool = False


class MemoryWatchdog:
    """Samples the RSS of plugin process groups and kills those over their limit."""

    def __init__(self, *, interval: float = 0.5, heartbeat_timeout: float | None = None) -> None:
        self.interval = interval
        self.heartbeat_timeout = heartbeat_timeout
        self._lock = threading.Lock()
        self._watched: dict[PluginProcess, _Watch] = {}
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def watch(self, process: PluginProcess, limit: int | None) -> None:
        """Sample ``process`` (spawned) until it exits; kill it once it is over ``limit``."""
        with self._lock:
            self._watched[process] = _Watch(limit)
            if self._thread is None and not self._closing.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="plugind-memory", daemon=True
                )
                self._thread.start()

    def rss(self, process: PluginProcess) -> int | None:
        """The last RSS sampled of ``process``'s group; ``None`` before the first or after exit."""
        watch = self._watched.get(process)
        return watch.rss if watch is not None and process.exited_at is None else None

    async def aclose(self) -> None:
        self._closing.set()
        thread = self._thread
        if thread is not None:
            await anyio.to_thread.run_sync(thread.join, 5.0)

    def _run(self) -> None:
        while not self._closing.wait(self.interval):
            with self._lock:
                for process in [p for p in self._watched if _exited(p)]:
                    del self._watched[process]
                if not self._watched:
                    self._thread = None
                    return
                watched = list(self._watched.items())
            try:
                self._sample(watched)
            except Exception:
                log.exception("Sampling the memory of plugin processes failed")

    def _sample(self, watched: list[tuple[PluginProcess, _Watch]]) -> None:
        totals = group_rss({p.pid for p, _ in watched if p.pid is not None})
        now = time.monotonic()
        for process, watch in watched:
            rss = totals.get(process.pid or 0)
            watch.rss = rss
            beat = process.last_heartbeat
            if (
                self.heartbeat_timeout is not None
                and beat is not None
                and not watch.killed
                and now - beat > self.heartbeat_timeout
                and not _exited(process)
            ):
                watch.killed = True
                process.kill(f"no heartbeat for {now - beat:.0f}s")
                continue
            if rss is None or watch.limit is None or rss <= watch.limit or watch.killed:
                continue
            if not _exited(process):
                watch.killed = True  # the kill logs a warning with plugin, pid, RSS and limit
                process.kill(f"RSS {mib(rss)} over its memory limit of {mib(watch.limit)}")


def _exited(process: PluginProcess) -> bool:
    return process.exited_at is not None or process.returncode is not None
