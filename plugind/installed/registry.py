"""Which plugin version each tenant has installed, as the workers see it.

Backed by the ``installed`` hash, which changes in the same atomic step as the terminal
install/uninstall event (see ``bus.scripts``), so it is never behind the events the way a
projection may be. It is also why tasks keep running while Postgres is down: resolving a
plugin needs Redis alone.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import redis.asyncio as aioredis

from plugind.bus.autopipeline import AutoPipeline
from plugind.bus.codec import text
from plugind.bus.keys import Keys, installed_field
from plugind.errors import PlugindError
from plugind.outage import Dependency, needs_postgres
from plugind.package.difypkg import parse_identifier
from plugind.projections.package_store import get_package_by_identifier
from plugind.projections.queries import list_plugins


class Registry:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        db: asyncpg.Pool,
        pipeline: AutoPipeline | None = None,
        *,
        postgres: Dependency | None = None,
    ) -> None:
        self._redis = redis
        self._pipeline = pipeline or AutoPipeline(redis)
        self._keys = keys
        self._db = db
        self._postgres = postgres
        self._known_identifiers: set[str] = set()

    async def installed(self, tenant_id: str, plugin_id: str) -> str | None:
        """The identifier ``tenant_id`` has installed for ``author/name``, if any."""
        value: Any = await self._pipeline.execute(
            "HGET", self._keys.installed, installed_field(tenant_id, plugin_id)
        )
        return text(value) if value else None

    async def restore_if_lost(self) -> int:
        """Refill an empty registry from the ``plugins`` read model; returns entries restored.

        The hash is derived state: if Redis lost it (a flush, a new Redis without persistence),
        the projection in Postgres still knows what is installed. ``HSETNX`` never overwrites an
        entry that a concurrent install wrote meanwhile.
        """
        if await self._redis.exists(self._keys.installed):
            return 0
        plugins = await list_plugins(self._db, status="installed")
        if not plugins:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for plugin in plugins:
                pipe.hsetnx(
                    self._keys.installed,
                    installed_field(plugin.tenant_id, plugin.plugin_id),
                    plugin.identifier,
                )
            await pipe.execute()
        return len(plugins)

    async def in_use(self, identifier: str) -> bool:
        """Whether any tenant still has ``identifier`` installed."""
        values: Any = await self._pipeline.execute("HVALS", self._keys.installed)
        return any(text(v) == identifier for v in values)

    async def resolve(self, tenant_id: str, plugin_ref: str) -> tuple[str, str]:
        """``(plugin_id, identifier)`` of a task's ``author/name`` or full identifier."""
        if ":" in plugin_ref or "@" in plugin_ref:
            author, name, _version, _checksum = parse_identifier(plugin_ref)
            plugin_id = f"{author}/{name}"
            if plugin_ref not in self._known_identifiers:
                # an installed version's package is in the store: only others need Postgres
                if not await self.in_use(plugin_ref):
                    with needs_postgres(f"running {plugin_ref}", self._postgres):
                        stored = await get_package_by_identifier(self._db, plugin_ref)
                    if stored is None:
                        raise PlugindError(
                            "unknown_plugin", f"no package {plugin_ref} is in the store"
                        )
                self._known_identifiers.add(plugin_ref)
            return plugin_id, plugin_ref
        if plugin_ref.count("/") != 1 or not all(plugin_ref.split("/")):
            raise PlugindError(
                "unknown_plugin",
                f"plugin_id {plugin_ref!r} is neither author/name nor author/name:version@checksum",
            )
        identifier = await self.installed(tenant_id, plugin_ref)
        if identifier is None:
            raise PlugindError(
                "not_installed", f"plugin {plugin_ref} is not installed for tenant {tenant_id}"
            )
        return plugin_ref, identifier
