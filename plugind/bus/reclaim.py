"""Finding work that a dead or frozen consumer left behind.

No lock is needed: ``XCLAIM`` with a min-idle time succeeds for only one claimer, because the
claim itself resets the idle time. Owners keep their live entries' idle time under a sixth of
``min_idle_ms`` (see ``consumer``), so an entry's idle time is its owner's silence, and only
entries of dead or frozen consumers (or ones a handler gave up on) reach ``min_idle_ms``.

Reclaim is for dead nodes. A live node rides out a Redis outage itself (its commits wait for
Redis, see ``bus.autopipeline``), and after one takes back its own orphans (``owner``) at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from plugind.bus.codec import text
from plugind.bus.delivery import Delivery


@dataclass(slots=True)
class Reclaimed:
    run: list[Delivery] = field(default_factory=list)
    dead: list[Delivery] = field(default_factory=list)
    owners: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (owner, idle ms)


async def reclaim_once(
    redis: aioredis.Redis,
    *,
    stream: str,
    group: str,
    consumer: str,
    in_flight: set[str],
    min_idle_ms: int,
    max_deliveries: int,
    limit: int,
    owner: str | None = None,
) -> Reclaimed:
    """Claim up to ``limit`` stale entries; those delivered ``max_deliveries`` times go to ``dead``.

    Deliveries are counted as Redis counts them: the claim here is one more delivery. A dead
    entry's ``deliveries`` is how often a handler really got it. With ``owner``, only entries
    pending for that consumer are looked at (a consumer taking back its own orphans).
    """
    out = Reclaimed()
    if limit <= 0:
        return out
    pending: list[dict[str, Any]] = await redis.xpending_range(
        stream,
        group,
        min="-",
        max="+",
        count=limit + len(in_flight) if owner else limit,
        consumername=owner,
        idle=min_idle_ms or None,
    )
    for item in pending:
        if len(out.run) + len(out.dead) >= limit:
            break
        entry_id = text(item["message_id"])
        if entry_id in in_flight:
            continue  # ours and running: not stale, merely slow
        deliveries = int(item["times_delivered"])
        claimed: list[Any] = await redis.xclaim(stream, group, consumer, min_idle_ms, [entry_id])
        if not claimed:
            continue  # someone else claimed it first
        claimed_id, fields = claimed[0]
        out.owners[text(claimed_id)] = (text(item["consumer"]), int(item["time_since_delivered"]))
        if deliveries >= max_deliveries:
            out.dead.append(Delivery(stream, text(claimed_id), dict(fields or {}), deliveries))
        else:
            out.run.append(Delivery(stream, text(claimed_id), dict(fields or {}), deliveries + 1))
    return out
