"""What every route of the Dify dialect needs, built once when the :5002 app is made.

NOTE to the dispatch/streaming half (plugind/dify/dispatch.py): ``plugind.dify.app`` builds one
:class:`DifyDeps` and calls ``dispatch_routes(deps) -> list[BaseRoute]``; the routes it returns
are mounted as they are, under the same ``X-Api-Key`` check as the management routes (the check
runs before any route, so dispatch code need not repeat it). Paths are absolute
(``/plugin/{tenant_id}/dispatch/...``). Everything below is shared and owned by the daemon;
never close it. Ask for more fields here rather than reaching into the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from plugind.backwards import InnerApi
from plugind.bus.codec import text
from plugind.bus.keys import Keys, installed_field
from plugind.client import Client
from plugind.config import Settings


@dataclass
class DifyDeps:
    redis: aioredis.Redis
    keys: Keys
    pool: asyncpg.Pool
    settings: Settings
    # PEM bytes of the trusted package-signing keys (PLUGIN_SIGNATURE_PUBLIC_KEYS), if any
    signature_keys: tuple[bytes, ...] = ()
    # Dify's inner API (DIFY_INNER_API_URL): encrypts endpoint settings; None when not set
    inner_api: InnerApi | None = None
    client: Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = Client(self.redis, self.keys)

    async def installed(self, tenant_id: str, plugin_id: str) -> str | None:
        """The identifier ``tenant_id`` has installed for ``author/name``, or None.

        Read from the ``installed`` hash, which changes in the same atomic step as the
        terminal install/uninstall event, so it is never behind what the workers see.
        """
        value: Any = await self.redis.hget(
            self.keys.installed, installed_field(tenant_id, plugin_id)
        )
        return text(value) if value else None
