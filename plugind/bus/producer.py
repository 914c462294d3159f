"""Appending commands to their streams."""

from __future__ import annotations

import redis.asyncio as aioredis

from plugind.bus.codec import command_fields, text
from plugind.bus.keys import Keys
from plugind.messages import AnyCommand, TaskCommand


def stream_for(keys: Keys, command: AnyCommand) -> str:
    """Tasks and installs travel on separate streams so a slow install never delays tasks."""
    return keys.tasks if isinstance(command, TaskCommand) else keys.install


async def publish(redis: aioredis.Redis, keys: Keys, command: AnyCommand) -> str:
    """XADD ``command`` to its stream; returns the entry id."""
    entry_id = await redis.xadd(stream_for(keys, command), command_fields(command))
    return text(entry_id)
