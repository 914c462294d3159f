"""A streamed task's output, read as it comes: its chunks, then its terminal event.

The worker appends each plugin chunk to ``{ns}:out:<request_id>`` (field ``chunk``, JSON) and,
in the same atomic step as the terminal event, one entry ``end`` holding that event
(:mod:`plugind.bus.emit`). :func:`task_output` yields what each read brings; a request that
ends without an ``end`` entry (rejected, dead-lettered) is noticed through its ``done`` marker
when the stream is idle. (:mod:`plugind.dify.stream` reads the same stream into SSE frames.)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Final

import anyio
import msgspec
import orjson
import redis.asyncio as aioredis

from plugind.bus.codec import EVENT_FIELD, text
from plugind.bus.keys import Keys
from plugind.messages import AnyEvent, decode_event

IDLE_CHECK_S: Final = 2.0

Batch = list[dict[str, Any] | AnyEvent | None]


async def task_output(
    redis: aioredis.Redis, keys: Keys, request_id: str, deadline_s: float
) -> AsyncGenerator[Batch]:
    """The task's output in batches as read: chunks (dicts), then its terminal event.

    ``None`` stands for an outcome that never came (the deadline, or an event no longer in the
    events stream). The batch with the outcome is the last.
    """
    out = keys.out(request_id)
    cursor = "0-0"
    deadline = anyio.current_time() + deadline_s
    while True:
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            yield [None]
            return
        block = max(1, int(min(remaining, IDLE_CHECK_S) * 1000))
        reply: Any = await redis.xread({out: cursor}, count=512, block=block)
        entries: list[Any] = reply[0][1] if reply else []
        if not entries:
            marker: Any = await redis.get(keys.done(request_id))
            if not marker:
                continue
            rest: Any = await redis.xrange(out, min=f"({cursor}" if cursor != "0-0" else "-")
            entries = rest
            batch, cursor, done = _decode(entries, cursor)
            if not done:
                batch.append(await _event_at(redis, keys, text(marker)))
            yield batch
            return
        batch, cursor, done = _decode(entries, cursor)
        yield batch
        if done:
            return


def _decode(entries: list[Any], cursor: str) -> tuple[Batch, str, bool]:
    batch: Batch = []
    for entry_id, fields in entries:
        cursor = text(entry_id)
        chunk = fields.get(b"chunk")
        if chunk is not None:
            value = orjson.loads(chunk)
            if isinstance(value, dict):
                batch.append(value)
            continue
        end = fields.get(b"end")
        if end is not None:
            try:
                batch.append(decode_event(end))
            except msgspec.DecodeError:
                batch.append(None)
            return batch, cursor, True
    return batch, cursor, False


async def _event_at(redis: aioredis.Redis, keys: Keys, entry_id: str) -> AnyEvent | None:
    entries: Any = await redis.xrange(keys.events, min=entry_id, max=entry_id, count=1)
    raw = entries[0][1].get(EVENT_FIELD.encode()) if entries else None
    try:
        return decode_event(raw) if raw is not None else None
    except msgspec.DecodeError:
        return None
