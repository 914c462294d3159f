"""Redis Cluster: every key of a namespace lives in one slot, so one master serves it all.

The namespace is a hash tag (``{plugind}:…``, :mod:`plugind.bus.keys`), so every stream, marker,
hash, script and transaction of a deployment is on the master that owns that one slot. Rather
than a cluster client (which would route each command, and split pipelines and transactions by
slot for nothing), plugind talks to that master with a plain client: :func:`pin` finds it from
any node of the cluster (the ``REDIS_URL``) and points the client's connections at it. A URL
that names a server without cluster mode is used as is.

When the slot moves (a failover, a resharding), commands meet ``MOVED`` or ``CLUSTERDOWN``,
which the roles treat as an outage and retry (:func:`plugind.outage.is_redis_outage`); the
daemon checks the slot's owner every couple of seconds (:func:`follow`) and re-points the client,
so work resumes on the new master.

Scaling past one slot is several namespaces, ``{plugind:0}`` … ``{plugind:N-1}``, each on the
master that owns its slot, chosen by a hash of the plugin id
(:func:`plugind.bus.keys.shard_namespace`).
"""

from __future__ import annotations

import binascii
import logging
from typing import Any

import redis.asyncio as aioredis

from plugind.bus.codec import text
from plugind.bus.keys import Keys

log = logging.getLogger(__name__)

SLOTS = 16384


def key_slot(key: str) -> int:
    """The cluster slot of ``key`` (CRC16 of its hash tag, as Redis computes it)."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) % SLOTS


async def cluster_enabled(redis: aioredis.Redis) -> bool:
    info: dict[str, Any] = await redis.info("cluster")
    return bool(int(info.get("cluster_enabled", 0) or 0))


async def slot_owner(redis: aioredis.Redis, slot: int) -> tuple[str, int]:
    """``(host, port)`` of the master that serves ``slot``, as the node ``redis`` knows it."""
    ranges: Any = await redis.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
    return _owner_in(ranges, slot, _host(redis))


def _owner_in(ranges: Any, slot: int, default_host: str) -> tuple[str, int]:
    for entry in ranges:
        first, last, master = int(entry[0]), int(entry[1]), entry[2]
        if first <= slot <= last:
            return text(master[0]) or default_host, int(master[1])
    raise RuntimeError(f"no master of the cluster serves slot {slot} (cluster down?)")


def _host(redis: aioredis.Redis) -> str:
    return str(redis.connection_pool.connection_kwargs.get("host", "127.0.0.1"))


def address(redis: aioredis.Redis) -> tuple[str, int]:
    kwargs = redis.connection_pool.connection_kwargs
    return str(kwargs.get("host", "")), int(kwargs.get("port", 0) or 0)


class SlotPin:
    """Keeps a plain client pointed at the master that serves one namespace's slot."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.slot = key_slot(keys.tag)
        self.cluster = False
        self._known: list[tuple[str, int]] = [address(redis)]  # the URL's node first

    async def pin(self) -> tuple[str, int] | None:
        """Point the client at the slot's master; ``None`` (and nothing changed) without a
        cluster. Connections already open to another node are dropped."""
        if not await cluster_enabled(self.redis):
            return None
        self.cluster = True
        owner = await self._owner_from(self.redis)
        if owner != address(self.redis):
            log.info(
                "Redis Cluster: namespace %s (slot %d) is served by %s:%d",
                self.keys.namespace,
                self.slot,
                *owner,
            )
            await self._point(owner)
        return owner

    async def follow(self) -> bool:
        """Re-point the client if the slot moved to another master; returns whether it did.

        Asks the master it uses; when that one does not answer (it failed over), every other
        node it has heard of, until one knows the slot's new master.
        """
        before = address(self.redis)
        owner: tuple[str, int] | None = None
        try:
            owner = await self._owner_from(self.redis)
        except Exception as exc:
            log.debug("Master %s:%d did not say who serves slot %d: %r", *before, self.slot, exc)
            for node in [n for n in self._known if n != before]:
                probe = aioredis.Redis(
                    **{**self.redis.connection_pool.connection_kwargs, "host": node[0]},
                    port=node[1],
                )
                try:
                    owner = await self._owner_from(probe)
                    break
                except Exception:
                    continue
                finally:
                    await probe.aclose()
        if owner is None or owner == before:
            return False
        log.warning(
            "Redis Cluster: slot %d of namespace %s moved from %s:%d to %s:%d; following it",
            self.slot,
            self.keys.namespace,
            *before,
            *owner,
        )
        await self._point(owner)
        return True

    async def _owner_from(self, redis: aioredis.Redis) -> tuple[str, int]:
        ranges: Any = await redis.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
        nodes = {(text(n[0]) or _host(redis), int(n[1])) for entry in ranges for n in entry[2:]}
        self._known = sorted(set(self._known) | nodes)
        return _owner_in(ranges, self.slot, _host(redis))

    async def _point(self, owner: tuple[str, int]) -> None:
        pool: Any = self.redis.connection_pool
        pool.connection_kwargs["host"], pool.connection_kwargs["port"] = owner
        # the pool reuses its connection objects (reconnecting them to their own address), so
        # those it holds are re-addressed too; a command in flight on one fails as an outage
        for connection in [*pool._available_connections, *pool._in_use_connections]:
            connection.host, connection.port = owner
        await pool.disconnect()
