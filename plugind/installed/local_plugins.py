"""Plugins ready to run on this node: extracted, with a built environment.

Any node that lacks a plugin materialises it from the package store on first use, so adding a
node needs no shared disk. Concurrent first uses of one plugin share one build.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def forget(self, identifier: str) -> None:
        self._ready.pop(identifier, None)

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
                ready = await self._materialise(identifier, package, progress)
                self._ready[identifier] = ready
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
