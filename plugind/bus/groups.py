"""Consumer groups come into being on first use, by whichever role gets there first.

Workers, the projector and a daemon started without the worker role all create the groups they
rely on, so no start-up order between nodes or roles matters.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import ResponseError


async def ensure_group(redis: aioredis.Redis, stream: str, group: str, start: str = "0") -> None:
    """Create ``group`` on ``stream`` (and the stream) unless it exists.

    ``start`` defaults to the stream's beginning: a group created after entries were appended
    must still see them, or commands published before the first worker started would be lost.
    """
    try:
        await redis.xgroup_create(stream, group, id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
