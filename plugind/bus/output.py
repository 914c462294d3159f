"""Following a request's live output, ``{ns}:out:<request_id>``: the one reader of output streams.

A task sent with ``"stream": true`` has each plugin chunk appended to its output stream as it
comes (field ``chunk``, :meth:`plugind.bus.emit.Emitter.chunk`) and, in the same atomic step as
its terminal event, one entry ``end`` holding that event (``scripts.TERMINAL_COMMIT``).
The Dify relay (:mod:`plugind.dify.stream`) and the gateway's server-sent events
(:mod:`plugind.http.gateway`) follow it through :class:`OutputFollower`: XREAD BLOCK from a
cursor that moves past every entry seen, the entries of one read handed over together (so a
burst of chunks can leave in one write), ending with :class:`End`, the request's terminal event.

That end is found in one of two ways:

* alone (the relay), in the ``end`` entry, or, for a request that ended without one (rejected,
  dead-lettered, sent without ``stream``), through its ``done`` marker, looked at whenever a read
  comes back empty;
* with ``events_after`` (the gateway), in the events stream, read in the same XREAD from that
  cursor and filtered for the request as :class:`~plugind.bus.follow.EventFollower` does; the
  request's other events come out too, in stream order with its chunks (both streams' ids come
  from one Redis clock). Every chunk is written before the terminal event, so any not read yet
  are read before :class:`End` is handed over.

A follower survives a failed read (a Redis outage): its cursors move only once a read and
everything it needed have succeeded, so calling it again resumes where it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
import redis.asyncio as aioredis

from plugind.bus.codec import field, id_order, read_stream_entries, text
from plugind.bus.follow import START, TAIL, EventFollower, FollowedEvent, events_tail, raw_event_at
from plugind.bus.keys import Keys
from plugind.messages import AnyEvent, decode_event, is_terminal

CHUNK_FIELD: Final = "chunk"
END_FIELD: Final = "end"


@dataclass(frozen=True, slots=True)
class Chunk:
    entry_id: str
    data: bytes  # the chunk's JSON as the worker wrote it


@dataclass(frozen=True, slots=True)
class End:
    """The request's outcome: where its terminal event was found, and that event's JSON.

    ``raw`` is None when the request ended (its ``done`` marker is set) but its event is no
    longer in the events stream (trimmed; the event log has it).
    """

    entry_id: str
    raw: bytes | None

    def event(self) -> AnyEvent | None:
        """The terminal event (None: gone); raises :class:`msgspec.DecodeError` if it is not one."""
        return decode_event(self.raw) if self.raw is not None else None


Output = Chunk | FollowedEvent | End


def parse_output(entries: Iterable[tuple[str, Mapping[Any, Any]]]) -> list[Chunk | End]:
    """The chunks of output stream entries, up to and including the ``end`` entry if there."""
    items: list[Chunk | End] = []
    for entry_id, fields in entries:
        item = _output_item(entry_id, fields)
        if item is not None:
            items.append(item)
            if isinstance(item, End):
                break
    return items


async def read_output(
    redis: aioredis.Redis, keys: Keys, request_id: str, *, after: str = START
) -> list[Chunk | End]:
    """What ``request_id``'s output stream holds after ``after``, without waiting."""
    entries: Any = await redis.xrange(
        keys.out(request_id), min="-" if after == START else f"({after}"
    )
    return parse_output((text(entry_id), fields) for entry_id, fields in entries)


class OutputFollower:
    """A request's output after a cursor, as it is appended: an async iterator of batches.

    Each batch is the non-empty list of what one read brought for the request (:class:`Chunk`,
    with ``events_after`` also its :class:`~plugind.bus.follow.FollowedEvent`), the last batch
    ending with :class:`End`; then iteration ends (``ended`` is True). Like
    :class:`~plugind.bus.follow.EventFollower` it yields ``None`` whenever ``block_ms`` has
    passed with nothing for the request, and with ``until`` (a time of
    :func:`anyio.current_time`) iteration ends there, without an :class:`End`.
    ``cursor`` is the last output entry looked at.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        request_id: str,
        *,
        after: str = START,
        events_after: str | None = None,
        block_ms: int = 2000,
        count: int = 512,
        until: float | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._request_id = request_id
        self._out = keys.out(request_id)
        self.cursor = after
        self._events = (
            None
            if events_after is None
            else EventFollower(redis, keys, after=events_after, request_id=request_id)
        )
        self._block_ms = block_ms
        self._count = count
        self._until = until
        self._quiet_since: float | None = None
        self.ended = False

    def __aiter__(self) -> OutputFollower:
        return self

    async def __anext__(self) -> list[Output] | None:
        if self._quiet_since is None:
            self._quiet_since = anyio.current_time()
        while not self.ended:
            block = self._block_ms
            if self._until is not None:
                remaining = self._until - anyio.current_time()
                if remaining <= 0:
                    break
                block = max(1, min(block, int(remaining * 1000)))
            items, read_any = await self._read(block)
            if not read_any and self._events is None:
                items = await self._ended_without_end()
            now = anyio.current_time()
            if items:
                self._quiet_since = now
                return items
            if not read_any or now - self._quiet_since >= self._block_ms / 1000:
                self._quiet_since = now
                return None
        raise StopAsyncIteration

    async def _read(self, block_ms: int) -> tuple[list[Output], bool]:
        """What one XREAD brings for the request, and whether it brought any entry at all."""
        events = self._events
        streams: dict[Any, Any] = {self._out: self.cursor}
        if events is not None:
            if events.cursor == TAIL:
                events.cursor = await events_tail(self._redis, self._keys)
            streams[self._keys.events] = events.cursor
        reply: Any = await self._redis.xread(streams, count=self._count, block=block_ms)
        entries = read_stream_entries(reply)
        entries.sort(key=lambda entry: id_order(entry[1]))
        cursor, events_cursor = self.cursor, events.cursor if events is not None else None
        items: list[Output] = []
        ended = False
        for stream, entry_id, fields in entries:
            if stream == self._out:
                cursor = entry_id
                item = _output_item(entry_id, fields)
                if isinstance(item, Chunk):
                    items.append(item)
                elif isinstance(item, End) and events is None:
                    items.append(item)
                    ended = True
                    break
                continue  # with the events stream, the end is its terminal event
            assert events is not None
            events_cursor = entry_id
            followed = events.decode(entry_id, fields)
            if followed is None:
                continue
            if is_terminal(followed.event):
                rest = await read_output(self._redis, self._keys, self._request_id, after=cursor)
                for item in rest:
                    cursor = item.entry_id
                    if isinstance(item, Chunk):
                        items.append(item)
                items.append(End(entry_id, followed.raw))
                ended = True
                break
            items.append(followed)
        self.cursor = cursor
        if events is not None and events_cursor is not None:
            events.cursor = events_cursor
        self.ended = ended
        return items, bool(entries)

    async def _ended_without_end(self) -> list[Output]:
        """After an empty read: if the request ended, what reached its output, then its end."""
        marker: Any = await self._redis.get(self._keys.done(self._request_id))
        if not marker:
            return []
        items: list[Output] = []
        rest = await read_output(self._redis, self._keys, self._request_id, after=self.cursor)
        if not rest or not isinstance(rest[-1], End):  # it ended without writing an end entry
            marker_id = text(marker)
            end = End(marker_id, await raw_event_at(self._redis, self._keys, marker_id))
            rest.append(end)
        for item in rest:
            if isinstance(item, Chunk):
                self.cursor = item.entry_id
            items.append(item)
        self.ended = True
        return items


def _output_item(entry_id: str, fields: Mapping[Any, Any]) -> Chunk | End | None:
    chunk = field(fields, CHUNK_FIELD)
    if chunk is not None:
        return Chunk(entry_id, chunk)
    end = field(fields, END_FIELD)
    return End(entry_id, end) if end is not None else None
