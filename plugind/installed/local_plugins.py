"""Plugins ready to run on this node: extracted, with a built environment.

Any node that lacks a plugin materialises it from the package store on first use, so adding a
node needs no shared disk. Concurrent first uses of one plugin share one build.

Every use (a task's run, an install's launch) is counted while it lasts (:meth:`LocalPlugins.use`),
so that a version no tenant has installed any more can be retired without failing what runs on
it: :meth:`LocalPlugins.retire` lets the uses in flight finish, stops the processes, and removes
the folder with its environment. New uses of that version wait for the retirement, then build
it again (a task may name a version by its full identifier).

Folders are claimed per node (``<author>/.<folder>.claims/<namespace>@<node>``, beside the
folder, written before extracting): a folder is deleted only when no other claim is left, so
nodes that share a disk, or several namespaces on one ``PLUGIN_DIR``, never delete a folder
another one uses. Claims of dead nodes of our namespace (no report in Redis) do not count.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import anyio
import asyncpg
import yaml

from plugind.config import Settings
from plugind.errors import PlugindError
from plugind.outage import Dependency, needs_postgres
from plugind.package.difypkg import PluginPackage, install_dir, read_package
from plugind.package.extract import extract
from plugind.projections.package_store import get_package_by_identifier
from plugind.runtime.environment import ensure_environment
from plugind.runtime.interpreter import find_plugin_python

log = logging.getLogger(__name__)

Progress = Callable[[str, str], Awaitable[None]]

CLAIMS_SUFFIX: Final = ".claims"
LOCK_NAME: Final = ".plugind.lock"  # one per PLUGIN_DIR: claims and deletions, never builds


def claim_name(namespace: str, node: str) -> str:
    """The file name of a node's claim (a namespace never holds ``@``; a node name may hold
    anything, so it is quoted)."""
    return f"{namespace}@{quote(node, safe='')}"


def claims_dir(workdir: Path) -> Path:
    return workdir.parent / f".{workdir.name}{CLAIMS_SUFFIX}"


@dataclass(frozen=True, slots=True)
class LocalPlugin:
    identifier: str
    workdir: Path
    python: Path
    entrypoint: str


class LocalPlugins:
    def __init__(
        self, settings: Settings, db: asyncpg.Pool, *, postgres: Dependency | None = None
    ) -> None:
        self._settings = settings
        self._db = db
        self._postgres = postgres
        self._ready: dict[str, LocalPlugin] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._users: dict[str, int] = {}
        self._last_used: dict[str, float] = {}  # time.monotonic() of the last use's end
        self._idle: dict[str, anyio.Event] = {}  # set when a version's last user leaves
        self.claim = claim_name(settings.namespace, settings.node)

    def forget(self, identifier: str) -> None:
        self._ready.pop(identifier, None)

    @property
    def ready(self) -> Collection[str]:
        """The versions this process has materialised (and not retired since)."""
        return self._ready.keys()

    def in_use(self, identifier: str) -> int:
        return self._users.get(identifier, 0)

    def idle_for(self, identifier: str) -> float:
        """Seconds since ``identifier`` was last used here; infinite if never in this process."""
        if self._users.get(identifier):
            return 0.0
        last = self._last_used.get(identifier)
        return float("inf") if last is None else time.monotonic() - last

    @contextlib.asynccontextmanager
    async def use(
        self,
        identifier: str,
        *,
        package: PluginPackage | None = None,
        progress: Progress | None = None,
    ) -> AsyncIterator[LocalPlugin]:
        """:meth:`ensure` ``identifier`` and count the caller as its user until it leaves."""
        plugin = await self.ensure(identifier, package=package, progress=progress)
        self._users[identifier] = self._users.get(identifier, 0) + 1
        try:
            yield plugin
        finally:
            left = self._users[identifier] - 1
            if left:
                self._users[identifier] = left
            else:
                del self._users[identifier]
                idle = self._idle.pop(identifier, None)
                if idle is not None:
                    idle.set()
            self._last_used[identifier] = time.monotonic()

    async def retire(
        self,
        identifier: str,
        *,
        stop: Callable[[str], Awaitable[None]],
        still_wanted: Callable[[], Awaitable[bool]],
        drain_timeout: float,
        live_claims: Callable[[], Awaitable[set[str]]] | None = None,
    ) -> bool:
        """Retire ``identifier`` on this node: drain its uses, ``stop`` it, remove its folder.

        New uses wait meanwhile. ``still_wanted`` is asked after the drain (an install of the
        same version may have landed): if it says yes, nothing is stopped. Uses still running
        after ``drain_timeout`` are cut off by the stop (``plugin_crashed``). ``live_claims``
        names the claims of our namespace's live nodes (the rest of our namespace's are stale).
        Returns whether the version was retired.
        """
        lock = self._locks.setdefault(identifier, anyio.Lock())
        async with lock:
            self._ready.pop(identifier, None)
            with anyio.move_on_after(drain_timeout) as drained:
                while self._users.get(identifier):
                    await self._idle.setdefault(identifier, anyio.Event()).wait()
            if drained.cancelled_caught:
                log.warning(
                    "Plugin %s still had %d request(s) running after %.0fs of draining; "
                    "stopping it anyway",
                    identifier,
                    self._users.get(identifier, 0),
                    drain_timeout,
                )
            if await still_wanted():
                return False
            await stop(identifier)
            live = await live_claims() if live_claims is not None else None
            workdir = install_dir(self._settings.plugin_dir, identifier)
            removed = await anyio.to_thread.run_sync(self._release, workdir, live)
            self._last_used.pop(identifier, None)
            log.info(
                "Plugin %s retired on this node: processes stopped, %s",
                identifier,
                "folder and environment removed"
                if removed
                else "folder kept (another node or namespace claims it)",
            )
            return True

    def claimed(self) -> dict[str, Path]:
        """The versions on disk that nodes of our namespace claim (this one, or ones that ran
        here before it, under another name): identifier -> folder."""
        root = self._settings.plugin_dir
        found: dict[str, Path] = {}
        pattern = f"*/.*{CLAIMS_SUFFIX}/{_glob_escape(self._settings.namespace)}@*"
        for claim in root.glob(pattern):
            try:
                identifier = claim.read_text().strip()
            except OSError:
                continue
            if identifier:
                found[identifier] = install_dir(root, identifier)
        return found

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        root = self._settings.plugin_dir
        root.mkdir(parents=True, exist_ok=True)
        with open(root / LOCK_NAME, "a+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield

    def _write_claim(self, identifier: str, workdir: Path) -> None:
        with self._locked():
            claims = claims_dir(workdir)
            claims.mkdir(parents=True, exist_ok=True)
            (claims / self.claim).write_text(identifier)

    def _release(self, workdir: Path, live: set[str] | None) -> bool:
        """Drop our claim on ``workdir``; delete it unless another (live) claim is left."""
        namespace = self._settings.namespace
        with self._locked():
            claims = claims_dir(workdir)
            (claims / self.claim).unlink(missing_ok=True)
            others = sorted(p.name for p in claims.iterdir()) if claims.is_dir() else []
            for other in others:
                ours = other.split("@", 1)[0] == namespace
                if ours and live is not None and other not in live:
                    (claims / other).unlink(missing_ok=True)  # a dead node of our namespace
                else:
                    return False
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(claims, ignore_errors=True)
            return True

    async def ensure(
        self,
        identifier: str,
        *,
        package: PluginPackage | None = None,
        progress: Progress | None = None,
    ) -> LocalPlugin:
        """Extract and build ``identifier`` unless this node already has it."""
        ready = self._ready.get(identifier)
        if ready is not None:
            return ready
        lock = self._locks.setdefault(identifier, anyio.Lock())
        async with lock:
            ready = self._ready.get(identifier)
            if ready is None:
                workdir = install_dir(self._settings.plugin_dir, identifier)
                # claimed before extracting, so no other node deletes it under our feet
                await anyio.to_thread.run_sync(self._write_claim, identifier, workdir)
                ready = await self._materialise(identifier, package, progress)
                self._ready[identifier] = ready
                self._last_used.setdefault(identifier, time.monotonic())
            return ready

    async def _materialise(
        self, identifier: str, package: PluginPackage | None, progress: Progress | None
    ) -> LocalPlugin:
        settings = self._settings
        workdir = install_dir(settings.plugin_dir, identifier)
        if not await anyio.Path(workdir / "manifest.yaml").exists():
            if package is None:
                package = await self._from_store(identifier)
                log.info("Materialising %s from the package store", identifier)
            if progress is not None:
                await progress("extract", f"extracting to {workdir}")
            await anyio.to_thread.run_sync(extract, package, workdir)
        elif progress is not None:
            await progress("extract", f"already extracted at {workdir}")
        entrypoint = package.entrypoint if package else await _entrypoint(workdir)
        interpreter = await anyio.to_thread.run_sync(find_plugin_python, settings.plugin_python)
        if progress is not None:
            await progress("dependencies", f"building the environment with {interpreter}")
        python = await ensure_environment(
            workdir,
            interpreter,
            index_url=settings.plugin_pip_index_url,
            offline=settings.plugin_offline,
            timeout=settings.install_timeout,
        )
        return LocalPlugin(identifier, workdir, python, entrypoint)

    async def _from_store(self, identifier: str) -> PluginPackage:
        # the one step of running a task that needs Postgres, and only on a node's first use
        with needs_postgres(f"materialising {identifier} on this node", self._postgres):
            stored = await get_package_by_identifier(self._db, identifier)
        if stored is None:
            raise PlugindError(
                "unknown_plugin", f"package {identifier} is not in the package store"
            )
        return await anyio.to_thread.run_sync(
            lambda: read_package(stored.data, max_size=self._settings.max_package_size)
        )


async def _entrypoint(workdir: Path) -> str:
    text = await anyio.Path(workdir / "manifest.yaml").read_text()
    manifest: Any = yaml.safe_load(text)
    try:
        entrypoint = manifest["meta"]["runner"]["entrypoint"]
    except (KeyError, TypeError):
        entrypoint = "main"
    return str(entrypoint)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
