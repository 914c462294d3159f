"""What a plugin may call back into: the ``resource.permission`` of its manifest.

Read from the package store (the manifest plugind verified at install), never from the plugin's
folder or its own startup line, which the plugin itself could change. A package's manifest
never changes under its identifier, so each is read once per node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import orjson

from plugind.backwards.kinds import Kind

# The SDK's default quota when the manifest enables storage without a size (dify_plugin's
# PluginResourceRequirements.Permission.Storage.size).
DEFAULT_STORAGE_SIZE: Final = 1024 * 1024
_LABELS: Final = {
    "tool": "tool",
    "llm": "llm",
    "text_embedding": "text-embedding",
    "rerank": "rerank",
    "tts": "tts",
    "speech2text": "speech2text",
    "moderation": "moderation",
    "node": "node",
    "app": "app",
    "storage": "storage",
    "endpoint": "endpoint",
}
_MODEL_TYPES: Final = ("llm", "text_embedding", "rerank", "tts", "speech2text", "moderation")


def _on(section: Any, flag: str = "enabled") -> bool:
    return isinstance(section, dict) and section.get(flag) is True


@dataclass(frozen=True, slots=True)
class Permission:
    """The permissions a manifest grants, as flags (model types need ``model`` enabled too)."""

    granted: frozenset[str]
    storage_size: int = 0

    @classmethod
    def from_declaration(cls, declaration: Any) -> Permission:
        resource = declaration.get("resource") if isinstance(declaration, dict) else None
        permission = resource.get("permission") if isinstance(resource, dict) else None
        if not isinstance(permission, dict):
            return cls(frozenset())
        granted = {n for n in ("tool", "node", "endpoint", "app") if _on(permission.get(n))}
        model = permission.get("model")
        if _on(model):
            granted.add("model")
            granted.update(t for t in _MODEL_TYPES if _on(model, t))
        storage = permission.get("storage")
        size = 0
        if isinstance(storage, dict) and _on(storage):
            granted.add("storage")
            raw = storage.get("size")
            size = DEFAULT_STORAGE_SIZE
            if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0:
                size = raw
        return cls(frozenset(granted), size)

    def allows(self, needs: str) -> bool:
        return not needs or needs in self.granted

    def denial(self, kind: Kind) -> str | None:
        """Why the manifest does not allow ``kind`` (upstream's words), or None."""
        if self.allows(kind.needs):
            return None
        return (
            f"permission denied, you need to enable {_LABELS.get(kind.needs, kind.needs)} "
            "access in plugin manifest"
        )


_QUERY: Final = """
SELECT declaration::text FROM packages WHERE identifier = $1 ORDER BY created_at DESC LIMIT 1
"""


class Permissions:
    """Each plugin version's permissions, read from the package store once."""

    def __init__(self, db: asyncpg.Pool) -> None:
        self._db = db
        self._known: dict[str, Permission] = {}

    async def of(self, identifier: str) -> Permission:
        """The permissions of ``identifier``; none at all if it is not in the store.

        Raises asyncpg's errors while Postgres is down (then nothing is cached).
        """
        known = self._known.get(identifier)
        if known is not None:
            return known
        raw = await self._db.fetchval(_QUERY, identifier)
        if raw is None:
            return Permission(frozenset())  # not cached: it may be stored later
        permission = Permission.from_declaration(orjson.loads(raw))
        self._known[identifier] = permission
        return permission
