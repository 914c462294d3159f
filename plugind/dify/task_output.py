"""A streamed task's output as the endpoint hooks consume it: chunks as dicts, then the outcome.

The reading (cursor, idle done-marker check, deadline) is
:class:`plugind.bus.output.OutputFollower`, the one reader of the output streams; this only shapes
its items for :mod:`plugind.dify.hooks`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import anyio
import msgspec
import orjson
import redis.asyncio as aioredis

from plugind.bus.keys import Keys
from plugind.bus.output import Chunk, End, OutputFollower
from plugind.messages import AnyEvent

Batch = list[dict[str, Any] | AnyEvent | None]


async def task_output(
    redis: aioredis.Redis, keys: Keys, request_id: str, deadline_s: float
) -> AsyncGenerator[Batch]:
    """The task's output in batches as read: chunks (dicts), then its terminal event.

    ``None`` stands for an outcome that never came (the deadline, or an event no longer in the
    events stream). The batch with the outcome is the last.
    """
    follower = OutputFollower(redis, keys, request_id, until=anyio.current_time() + deadline_s)
    async for items in follower:
        batch: Batch = []
        for item in items or ():
            if isinstance(item, Chunk):
                value = orjson.loads(item.data)
                if isinstance(value, dict):
                    batch.append(value)
            elif isinstance(item, End):
                try:
                    batch.append(item.event())
                except msgspec.DecodeError:
                    batch.append(None)
        if batch:
            yield batch
    if not follower.ended:
        yield [None]
