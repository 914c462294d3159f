"""Reading ``{ns}:events`` in batches through the ``projector`` consumer group.

The group's pending list is what makes the projector crash-safe: an entry read but not committed
stays pending, so it is read again, by this node (its own pending entries come first after a
start or a failure) or by the next leader (which claims every pending entry when it takes over).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from plugind.bus.codec import read_entries, text
from plugind.bus.groups import ensure_group
from plugind.bus.keys import PROJECTOR_GROUP, Keys
from plugind.projections._entries import LogEntry, decode_entry

log = logging.getLogger(__name__)


class BatchReader:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        consumer: str,
        *,
        batch_size: int = 500,
        block_ms: int = 1000,
    ) -> None:
        self.redis = redis
        self.stream = keys.events
        self.consumer = consumer
        self.batch_size = batch_size
        self.block_ms = block_ms
        self._pending_first = True

    async def take_over(self) -> None:
        """Start reading as the (new) leader: make sure the group exists, claim what is pending.

        Without the claim, a leader taking over would read only new entries, commit past the
        batch its predecessor read but never committed, and the checkpoint would then skip that
        batch for ever.
        """
        await ensure_group(self.redis, self.stream, PROJECTOR_GROUP)
        cursor = "0-0"
        while True:
            reply: Any = await self.redis.xautoclaim(
                self.stream, PROJECTOR_GROUP, self.consumer, 0, cursor, count=self.batch_size
            )
            cursor = text(reply[0])  # (justid=True would make redis-py drop the cursor)
            if cursor == "0-0":
                break
        self._pending_first = True

    @property
    def pending_first(self) -> bool:
        """Whether the next read is of our own pending entries (after a start or a failure)."""
        return self._pending_first

    def reread(self) -> None:
        """Read our pending entries again first: the last batch was not committed."""
        self._pending_first = True

    async def read(self) -> list[LogEntry]:
        """The next batch, decoded (garbage as ``unknown`` entries); [] if none came in time."""
        try:
            if self._pending_first:
                entries = read_entries(
                    await self.redis.xreadgroup(
                        PROJECTOR_GROUP,
                        self.consumer,
                        {self.stream: "0"},
                        count=self.batch_size,
                    )
                )
                if entries:
                    return [decode_entry(sid, fields) for sid, fields in entries]
                self._pending_first = False
            entries = read_entries(
                await self.redis.xreadgroup(
                    PROJECTOR_GROUP,
                    self.consumer,
                    {self.stream: ">"},
                    count=self.batch_size,
                    block=self.block_ms or None,
                )
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("%s on %s; recreating the projector group", exc, self.stream)
            await ensure_group(self.redis, self.stream, PROJECTOR_GROUP)
            return []
        return [decode_entry(sid, fields) for sid, fields in entries]

    async def ack(self, batch: Sequence[LogEntry]) -> None:
        """Acknowledge a committed batch (only once it is committed: see the module doc)."""
        if batch:
            await self.redis.xack(self.stream, PROJECTOR_GROUP, *(e.stream_id for e in batch))
