"""Every node's metrics, shared through Redis so that any ``api`` node serves them all.

Each node (whatever its roles) writes its registry in Prometheus text, compressed, to
``{ns}:metrics:<node>`` every ``interval`` seconds with a TTL of three intervals, and indexes
itself in ``{ns}:metrics_nodes``. ``/metrics`` reads the live ones and relabels them with
``node`` (:mod:`plugind.http.metrics`). As with the pool reports (:mod:`plugind.bus.nodes`),
liveness is the TTL, a clean stop removes the key at once, and publishing is best effort.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from typing import Any, Final

import anyio
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from redis.exceptions import RedisError

from plugind.bus.codec import text
from plugind.bus.keys import Keys
from plugind.bus.nodes import INDEX_KEEP_S, REPORT_INTERVAL_S, report_ttl_ms

log = logging.getLogger(__name__)

_LEVEL: Final = 6


async def publish_metrics(
    redis: aioredis.Redis, keys: Keys, node: str, registry: CollectorRegistry, *, ttl_ms: int
) -> None:
    blob = zlib.compress(generate_latest(registry), _LEVEL)
    now = time.time()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.metrics(node), blob, px=ttl_ms)
        pipe.zadd(keys.metrics_nodes, {node: now})
        pipe.zremrangebyscore(keys.metrics_nodes, "-inf", now - INDEX_KEEP_S)
        pipe.expire(keys.metrics_nodes, INDEX_KEEP_S)
        await pipe.execute()


async def read_metrics(redis: aioredis.Redis, keys: Keys) -> dict[str, str]:
    """``node -> Prometheus text`` of every node whose publication has not expired."""
    members: Any = await redis.zrange(keys.metrics_nodes, 0, -1)
    names = sorted(text(m) for m in members)
    if not names:
        return {}
    blobs: list[Any] = await redis.mget([keys.metrics(n) for n in names])
    found: dict[str, str] = {}
    for name, blob in zip(names, blobs, strict=True):
        if blob is None:
            continue
        try:
            found[name] = zlib.decompress(blob).decode()
        except (zlib.error, UnicodeDecodeError) as exc:
            log.warning("Skipping the unreadable metrics of node %s: %s", name, exc)
    return found


async def run_metrics_share(
    redis: aioredis.Redis,
    keys: Keys,
    *,
    node: str,
    registry: CollectorRegistry,
    interval: float = REPORT_INTERVAL_S,
) -> None:
    """Publish ``registry`` now and every ``interval`` seconds until cancelled."""
    ttl_ms = report_ttl_ms(interval)
    failing = False
    try:
        while True:
            try:
                await publish_metrics(redis, keys, node, registry, ttl_ms=ttl_ms)
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("Cannot publish this node's metrics: %s", exc)
                failing = True
            else:
                failing = False
            await anyio.sleep(interval)
    finally:
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(2),
            contextlib.suppress(RedisError, OSError),
        ):
            async with redis.pipeline(transaction=True) as pipe:
                pipe.delete(keys.metrics(node))
                pipe.zrem(keys.metrics_nodes, node)
                await pipe.execute()
