"""Plugin storage: the key-value store a plugin keeps through ``self.session.storage``.

Per tenant and plugin (``author/name``, so an upgrade keeps the data), in Postgres, so it
survives restarts and every node sees the same. The quota is the manifest's
``resource.permission.storage.size``, capped by ``PLUGIN_STORAGE_MAX_SIZE``, and counts value
bytes as upstream does; the usage row is locked while a ``set`` checks and changes it, so two
nodes writing at once cannot pass the quota together. Keys follow upstream's rules: at most 256
bytes, no ``..`` and no backslash (upstream keeps values in files named by the key).

Values are plugin data, not plugind's state: they are not in the event log (whose
``task.backwards_invoked`` events record only the operation).
"""

from __future__ import annotations

from typing import Final

import asyncpg

from plugind.backwards.errors import StorageError

MAX_KEY_BYTES: Final = 256


def check_key(key: object) -> str:
    """``key`` if upstream would accept it; raises :class:`StorageError` saying why not."""
    if not isinstance(key, str) or not key:
        raise StorageError("the storage key must be a non-empty string")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise StorageError(f"key length must be less than {MAX_KEY_BYTES} characters")
    if ".." in key or "\\" in key:
        raise StorageError("invalid key: path traversal attempt detected")
    return key


_LOCK_USAGE: Final = """
INSERT INTO plugin_storage_usage (tenant_id, plugin_id, bytes) VALUES ($1, $2, 0)
ON CONFLICT (tenant_id, plugin_id) DO UPDATE SET bytes = plugin_storage_usage.bytes
RETURNING bytes
"""
_OLD_SIZE: Final = """
SELECT octet_length(value) FROM plugin_storage
WHERE tenant_id = $1 AND plugin_id = $2 AND key = $3
"""
_PUT: Final = """
INSERT INTO plugin_storage (tenant_id, plugin_id, key, value) VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, plugin_id, key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()
"""
_ADD_USAGE: Final = """
UPDATE plugin_storage_usage SET bytes = bytes + $3 WHERE tenant_id = $1 AND plugin_id = $2
"""
_DELETE: Final = """
DELETE FROM plugin_storage WHERE tenant_id = $1 AND plugin_id = $2 AND key = $3
RETURNING octet_length(value)
"""


class PluginStorage:
    def __init__(self, db: asyncpg.Pool) -> None:
        self._db = db

    async def set(self, tenant_id: str, plugin_id: str, key: str, value: bytes, quota: int) -> None:
        """Store ``value`` under ``key``; :class:`StorageError` if it would pass ``quota``."""
        check_key(key)
        async with self._db.acquire() as conn, conn.transaction():
            used: int = await conn.fetchval(_LOCK_USAGE, tenant_id, plugin_id)
            old: int | None = await conn.fetchval(_OLD_SIZE, tenant_id, plugin_id, key)
            grows = len(value) - (old or 0)
            if used + grows > quota:
                raise StorageError(
                    f"allocated size is greater than max storage size: {used + grows} bytes "
                    f"would pass this plugin's quota of {quota} bytes"
                )
            await conn.execute(_PUT, tenant_id, plugin_id, key, value)
            if grows:
                await conn.execute(_ADD_USAGE, tenant_id, plugin_id, grows)

    async def get(self, tenant_id: str, plugin_id: str, key: str) -> bytes:
        check_key(key)
        value: bytes | None = await self._db.fetchval(
            "SELECT value FROM plugin_storage WHERE tenant_id = $1 AND plugin_id = $2 AND key = $3",
            tenant_id,
            plugin_id,
            key,
        )
        if value is None:
            raise StorageError(
                "load data failed, please check if the key is correct or you have not set it"
            )
        return value

    async def delete(self, tenant_id: str, plugin_id: str, key: str) -> int:
        """Delete ``key``; how many keys were deleted (0 or 1)."""
        check_key(key)
        async with self._db.acquire() as conn, conn.transaction():
            size: int | None = await conn.fetchval(_DELETE, tenant_id, plugin_id, key)
            if size is None:
                return 0
            if size:
                await conn.execute(_ADD_USAGE, tenant_id, plugin_id, -size)
            return 1

    async def exists(self, tenant_id: str, plugin_id: str, key: str) -> bool:
        check_key(key)
        found = await self._db.fetchval(
            "SELECT 1 FROM plugin_storage WHERE tenant_id = $1 AND plugin_id = $2 AND key = $3",
            tenant_id,
            plugin_id,
            key,
        )
        return found is not None

    async def usage(self, tenant_id: str, plugin_id: str) -> int:
        """Bytes of values the plugin keeps for the tenant."""
        used = await self._db.fetchval(
            "SELECT bytes FROM plugin_storage_usage WHERE tenant_id = $1 AND plugin_id = $2",
            tenant_id,
            plugin_id,
        )
        return int(used or 0)
