"""Following ``{ns}:events`` from a cursor: the one reader of the events stream outside the group.

Waiting for a request's end (the client), relaying its events (the gateway's SSE, which reads
them together with the request's live output through :mod:`plugind.bus.output`, filtered by
:meth:`EventFollower.decode`) and ``plugind events --follow`` all read the stream the same way:
XREAD BLOCK from a cursor that moves past every entry seen, so nothing appended after the cursor
is missed whatever the timing.
The projector reads through its consumer group instead (it must acknowledge), and shares only
the reply parsing (:func:`plugind.bus.codec.read_entries`).

Entries that are not valid events are skipped here: a follower shows events, and the projector
is the one that records garbage (as ``unknown`` rows of the event log).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import anyio
import msgspec
import redis.asyncio as aioredis

from plugind.bus.codec import EVENT_FIELD, field, read_entries, text
from plugind.bus.keys import Keys
from plugind.messages import AnyEvent, decode_event

log = logging.getLogger(__name__)

START: Final = "0-0"  # a cursor before every entry
TAIL: Final = "$"  # a cursor at the stream's current end, resolved when following starts


@dataclass(frozen=True, slots=True)
class FollowedEvent:
    entry_id: str
    event: AnyEvent
    raw: bytes  # the entry's JSON as appended, for relaying it unchanged


async def events_tail(redis: aioredis.Redis, keys: Keys) -> str:
    """The id of the stream's last entry (``0-0`` if it is empty): a cursor that misses nothing.

    Taken *before* publishing a command, it is where following for that command's events starts.
    """
    last: Any = await redis.xrevrange(keys.events, count=1)
    return text(last[0][0]) if last else START


async def event_at(redis: aioredis.Redis, keys: Keys, entry_id: str) -> AnyEvent | None:
    """The event at ``entry_id``, or None if it was trimmed (the event log still has it)."""
    raw = await raw_event_at(redis, keys, entry_id)
    return decode_event(raw) if raw is not None else None


async def raw_event_at(redis: aioredis.Redis, keys: Keys, entry_id: str) -> bytes | None:
    """The JSON of the event at ``entry_id`` as appended, or None if it was trimmed."""
    entries: Any = await redis.xrange(keys.events, min=entry_id, max=entry_id, count=1)
    return field(entries[0][1], EVENT_FIELD) if entries else None


def _needle(request_id: str) -> bytes | None:
    """The bytes a request id shows as in an event's JSON, when they can be told in advance.

    Looking for them before decoding spares decoding every other request's events; an id that
    JSON escapes (quotes, backslashes, control characters) is matched after decoding only.
    """
    plain = request_id.encode()
    return plain if msgspec.json.encode(request_id)[1:-1] == plain else None


class EventFollower:
    """The events after a cursor, as they are appended: an async iterator of :class:`FollowedEvent`.

    It also yields ``None`` whenever ``block_ms`` has passed without an event for it, so a
    caller can send a keep-alive, check its own state or give up; callers that need none of that
    skip it. With ``until`` (a time of :func:`anyio.current_time`) iteration ends there; with
    ``block_ms=None`` it never blocks and ends once it has caught up with the stream.
    ``cursor`` is the last entry looked at, to resume from.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        after: str = TAIL,
        request_id: str | None = None,
        block_ms: int | None = 1000,
        count: int = 500,
        until: float | None = None,
    ) -> None:
        self._redis = redis
        self._stream = keys.events
        self._keys = keys
        self.cursor = after
        self._request_id = request_id
        self._needle = _needle(request_id) if request_id is not None else None
        self._block_ms = block_ms
        self._count = count
        self._until = until
        self._ready: deque[FollowedEvent] = deque()
        self._quiet_since: float | None = None
        self._done = False

    def __aiter__(self) -> EventFollower:
        return self

    async def __anext__(self) -> FollowedEvent | None:
        if self._quiet_since is None:
            self._quiet_since = anyio.current_time()
        while not self._ready:
            if self._done:
                raise StopAsyncIteration
            block = self._block_ms
            if self._until is not None:
                remaining = self._until - anyio.current_time()
                if remaining <= 0:
                    raise StopAsyncIteration
                if block is not None:
                    block = max(1, min(block, int(remaining * 1000)))
            if self.cursor == TAIL:
                self.cursor = await events_tail(self._redis, self._keys)
            reply: Any = await self._redis.xread(
                {self._stream: self.cursor}, count=self._count, block=block
            )
            entries = read_entries(reply)
            for entry_id, fields in entries:
                self.cursor = entry_id
                followed = self.decode(entry_id, fields)
                if followed is not None:
                    self._ready.append(followed)
            now = anyio.current_time()
            if self._block_ms is None:
                self._done = len(entries) < self._count
            elif self._ready:
                self._quiet_since = now
            elif not entries or now - self._quiet_since >= self._block_ms / 1000:
                self._quiet_since = now
                return None
        return self._ready.popleft()

    def decode(self, entry_id: str, fields: dict[Any, Any]) -> FollowedEvent | None:
        """The entry as an event for this follower, or None (not an event, another request's).

        Public so that a reader of the events stream together with another stream
        (:class:`plugind.bus.output.OutputFollower`) filters them the same way.
        """
        raw = field(fields, EVENT_FIELD)
        if raw is None or (self._needle is not None and self._needle not in raw):
            return None
        try:
            event = decode_event(raw)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            log.debug("Skipping %s entry %s, not an event: %s", self._stream, entry_id, exc)
            return None
        if self._request_id is not None and event.request_id != self._request_id:
            return None
        return FollowedEvent(entry_id, event, raw)
