"""How far the projector is behind the events stream, from Redis alone.

Lag = entries not yet delivered to the ``projector`` group + entries delivered but not yet
acknowledged (the projector acks after commit, so both are events Postgres does not have yet).
"""

from __future__ import annotations

from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from plugind.bus.codec import text
from plugind.bus.keys import PROJECTOR_GROUP, Keys

COUNT_CAP: Final = 1_000_000


def _get(info: dict[Any, Any], name: str) -> Any:
    value = info.get(name)
    return value if value is not None else info.get(name.encode())


async def _count_after(redis: Redis, key: str, after: str, cap: int = COUNT_CAP) -> int:
    """Entries after ``after``, counted page by page (Redis < 7 has no ``lag`` field)."""
    count, cursor = 0, after
    while count < cap:
        page: Any = await redis.xrange(key, min=f"({cursor}", max="+", count=10_000)
        if not page:
            break
        count += len(page)
        cursor = text(page[-1][0])
    return min(count, cap)


async def projector_lag(redis: Redis, keys: Keys) -> int:
    """Events the projector has not committed yet (see module doc); 0 if the stream is absent."""
    try:
        groups = await redis.xinfo_groups(keys.events)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return 0
        raise
    for info in groups:
        if text(_get(info, "name")) != PROJECTOR_GROUP:
            continue
        pending = int(_get(info, "pending") or 0)
        lag = _get(info, "lag")
        if lag is None:  # Redis < 7, or a lag Redis cannot compute after deletions
            lag = await _count_after(redis, keys.events, text(_get(info, "last-delivered-id")))
        return int(lag) + pending
    return int(await redis.xlen(keys.events))
