"""Worker nodes' reports of their plugin pools, shared through Redis.

A pool lives in its daemon's memory, but ``plugind status`` runs in another process and
``/metrics`` may be served by a node that runs no worker at all (``--role api``), while
``--role worker`` nodes serve no HTTP. So every worker publishes its pool's numbers:

- ``{ns}:node:<node>``, a hash (``at``, ``version``, ``pool`` as JSON), rewritten every
  ``interval`` seconds with a TTL of three intervals. Liveness is Redis's expiry: a node that
  dies stops refreshing its key and drops out, whatever the clocks of the other machines say.
- ``{ns}:nodes``, a sorted set of node names scored by their last report, so that a reader
  lists the reports without a SCAN of the whole keyspace (which holds a ``done`` marker per
  request). Writers drop members that have not reported for an hour; readers skip members
  whose hash has expired.

A node that stops cleanly removes both at once. Publishing is best effort: a Redis outage
costs a few reports and a warning, never the worker.

The node name is also the worker's consumer name in the command streams, so two live nodes must
never share one: the newcomer would run the other's pending entries as its own backlog.
:func:`claim_node_name` refuses a name whose report is still being refreshed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import anyio
import msgspec
import redis.asyncio as aioredis
from msgspec import Struct
from redis.exceptions import RedisError

from plugind.bus.codec import text
from plugind.bus.keys import Keys
from plugind.errors import ConfigError
from plugind.messages import now_rfc3339
from plugind.runtime.pool import PoolSnapshot
from plugind.runtime.pool_report import PoolReport, pool_report

log = logging.getLogger(__name__)

REPORT_INTERVAL_S: Final = 5.0
INDEX_KEEP_S: Final = 3600  # a node silent for this long leaves the index (its hash is long gone)

_pool_decoder: Final = msgspec.json.Decoder(PoolReport)


class NodeReport(Struct, kw_only=True):
    """What one worker node said about itself in its last report."""

    node: str
    at: str  # RFC 3339 UTC, the node's clock
    version: str
    pool: PoolReport


def report_ttl_ms(interval: float) -> int:
    """Three intervals: one late or lost report does not make a live node disappear."""
    return max(int(interval * 3 * 1000), 1000)


async def publish(redis: aioredis.Redis, keys: Keys, report: NodeReport, *, ttl_ms: int) -> None:
    """Write ``report`` and refresh its node's place in the index, in one transaction."""
    key = keys.node(report.node)
    now = time.time()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(
            key,
            mapping={
                "at": report.at,
                "version": report.version,
                "pool": msgspec.json.encode(report.pool),
            },
        )
        pipe.pexpire(key, ttl_ms)
        pipe.zadd(keys.nodes, {report.node: now})
        pipe.zremrangebyscore(keys.nodes, "-inf", now - INDEX_KEEP_S)
        pipe.expire(keys.nodes, INDEX_KEEP_S)
        await pipe.execute()


async def claim_node_name(
    redis: aioredis.Redis, keys: Keys, node: str, *, interval: float = REPORT_INTERVAL_S
) -> None:
    """Return once no live node reports under ``node``; raise :class:`ConfigError` if one does.

    A report left by a previous instance that died (a crash, SIGKILL) stops changing and expires
    within three intervals, so a node restarted under a fixed ``PLUGIND_NODE`` waits for that at
    most; a report that is refreshed meanwhile belongs to a live node.
    """
    key = keys.node(node)
    first: Any = await redis.hget(key, "at")
    if first is None:
        return
    ttl_ms: Any = await redis.pttl(key)
    log.warning(
        "A report of node %s is still in Redis (last at %s); waiting for it to expire in case "
        "that node is alive",
        node,
        text(first),
    )
    with anyio.move_on_after(max(int(ttl_ms), 0) / 1000 + 1):
        while True:
            await anyio.sleep(min(interval / 5, 0.5))
            now: Any = await redis.hget(key, "at")
            if now is None:
                return
            if now != first:
                raise ConfigError(
                    f"PLUGIND_NODE={node} is the name of a live node (it reported at {text(now)}):"
                    " give every node its own name, or each would run the other's work as its own"
                )
    await redis.delete(key)  # outlived its TTL without a refresh: a leftover


async def withdraw(redis: aioredis.Redis, keys: Keys, node: str) -> None:
    """Remove ``node``'s report at once (a clean stop), rather than when its TTL runs out."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.node(node))
        pipe.zrem(keys.nodes, node)
        await pipe.execute()


async def read_reports(redis: aioredis.Redis, keys: Keys) -> list[NodeReport]:
    """The last report of every live worker node, by node name.

    A report that does not decode (a node of another plugind version, say) is skipped with a
    warning rather than failing the reader.
    """
    members: list[bytes] = await redis.zrange(keys.nodes, 0, -1)  # type: ignore[assignment]
    names = sorted(text(m) for m in members)
    if not names:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.node(name))
        hashes: list[dict[bytes, bytes]] = await pipe.execute()
    reports: list[NodeReport] = []
    for name, fields in zip(names, hashes, strict=True):
        if not fields:
            continue  # expired: the node is gone
        try:
            reports.append(
                NodeReport(
                    node=name,
                    at=text(fields[b"at"]),
                    version=text(fields[b"version"]),
                    pool=_pool_decoder.decode(fields[b"pool"]),
                )
            )
        except (KeyError, msgspec.DecodeError) as exc:
            log.warning("Skipping the unreadable report of node %s: %s", name, exc)
    return reports


async def run_reports(
    redis: aioredis.Redis,
    keys: Keys,
    *,
    node: str,
    version: str,
    snapshot: Callable[[], PoolSnapshot],
    interval: float = REPORT_INTERVAL_S,
) -> None:
    """Publish this node's pool now and every ``interval`` seconds until cancelled."""
    ttl_ms = report_ttl_ms(interval)
    failing = False
    try:
        while True:
            report = NodeReport(
                node=node, at=now_rfc3339(), version=version, pool=pool_report(snapshot())
            )
            try:
                await publish(redis, keys, report, ttl_ms=ttl_ms)
            except (RedisError, OSError) as exc:
                if not failing:  # once per outage, not every few seconds
                    log.warning("Cannot publish this node's plugin pool report: %s", exc)
                failing = True
            else:
                if failing:
                    log.info("Publishing this node's plugin pool report again")
                failing = False
            await anyio.sleep(interval)
    finally:
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(2),
            contextlib.suppress(RedisError, OSError),
        ):
            await withdraw(redis, keys, node)
