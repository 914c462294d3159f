"""Following a request's output stream: the reader behind the Dify relay and the gateway's SSE."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from plugind.bus.codec import text
from plugind.bus.follow import START, FollowedEvent
from plugind.bus.keys import Keys
from plugind.bus.output import Chunk, End, Output, OutputFollower, parse_output, read_output
from plugind.messages import (
    EventFactory,
    TaskResult,
    TaskStarted,
    TaskSucceeded,
    encode,
)

pytestmark = pytest.mark.anyio
ev = EventFactory("test-node")


def started(rid: str) -> TaskStarted:
    return ev(
        TaskStarted,
        request_id=rid,
        tenant_id="t1",
        plugin_id="acme/parrot",
        identifier="acme/parrot:0.1.0@abc",
        access="model",
        action="invoke_llm",
        attempt=1,
    )


def succeeded(rid: str) -> TaskSucceeded:
    return ev(
        TaskSucceeded,
        request_id=rid,
        tenant_id="t1",
        plugin_id="acme/parrot",
        result=TaskResult(chunks=[{"n": 1}]),
        duration_ms=1.0,
    )


async def chunk(redis: aioredis.Redis, keys: Keys, rid: str, n: int) -> str:
    return text(await redis.xadd(keys.out(rid), {"chunk": b'{"n":%d}' % n}))


async def event(redis: aioredis.Redis, keys: Keys, value: Any) -> str:
    return text(await redis.xadd(keys.events, {"event": encode(value)}))


async def commit(redis: aioredis.Redis, keys: Keys, rid: str, terminal: Any) -> str:
    """What the terminal commit writes for a streamed task: the event, the marker, ``end``."""
    entry_id = await event(redis, keys, terminal)
    await redis.set(keys.done(rid), entry_id)
    await redis.xadd(keys.out(rid), {"end": encode(terminal)})
    return entry_id


async def batches(follower: OutputFollower, timeout: float = 5) -> list[list[Output] | None]:
    with anyio.fail_after(timeout):
        return [batch async for batch in follower]


def flat(seen: list[list[Output] | None]) -> list[Output]:
    return [item for batch in seen if batch is not None for item in batch]


async def test_chunks_as_they_come_then_the_end(redis: aioredis.Redis, keys: Keys) -> None:
    ids = [await chunk(redis, keys, "r1", n) for n in range(3)]  # already there: one read
    follower = OutputFollower(redis, keys, "r1", block_ms=2000)

    async def later() -> None:
        await anyio.sleep(0.2)  # the follower is blocked on its second read by then
        ids.append(await chunk(redis, keys, "r1", 3))
        await anyio.sleep(0.1)
        await commit(redis, keys, "r1", succeeded("r1"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        seen = await batches(follower)
    assert [[item.entry_id for item in batch] for batch in seen if batch][:2] == [
        ids[:3],
        ids[3:],
    ]
    items = flat(seen)
    assert [item.data for item in items if isinstance(item, Chunk)] == [
        b'{"n":%d}' % n for n in range(4)
    ]
    end = items[-1]
    assert isinstance(end, End) and isinstance(end.event(), TaskSucceeded)
    assert follower.ended and follower.cursor == end.entry_id

    # from a cursor: only what comes after it
    rest = await batches(OutputFollower(redis, keys, "r1", after=ids[1], block_ms=100))
    assert [type(item).__name__ for item in flat(rest)] == ["Chunk", "Chunk", "End"]
    assert [item.entry_id for item in await read_output(redis, keys, "r1", after=ids[2])][:1] == [
        ids[3]
    ]


async def test_a_request_that_ended_without_an_end_entry(redis: aioredis.Redis, keys: Keys) -> None:
    """Rejected, dead-lettered, or not streamed: its done marker ends the output when idle."""
    await chunk(redis, keys, "r2", 1)
    marker = await event(redis, keys, succeeded("r2"))
    await redis.set(keys.done("r2"), marker)
    items = flat(await batches(OutputFollower(redis, keys, "r2", block_ms=50)))
    assert [type(item).__name__ for item in items] == ["Chunk", "End"]
    end = items[-1]
    assert isinstance(end, End) and end.entry_id == marker
    assert isinstance(end.event(), TaskSucceeded)

    # its event trimmed from the events stream: an end without it
    await redis.set(keys.done("r3"), "1-1")
    items = flat(await batches(OutputFollower(redis, keys, "r3", block_ms=50)))
    assert items == [End("1-1", None)]
    assert isinstance(items[0], End) and items[0].event() is None


async def test_quiet_periods_and_the_deadline(redis: aioredis.Redis, keys: Keys) -> None:
    started_at = anyio.current_time()
    follower = OutputFollower(redis, keys, "never", block_ms=100, until=started_at + 0.35)
    seen = await batches(follower)
    assert seen and all(batch is None for batch in seen)
    assert 0.3 <= anyio.current_time() - started_at < 2
    assert not follower.ended


async def test_with_the_events_stream_in_stream_order(redis: aioredis.Redis, keys: Keys) -> None:
    tail = await event(redis, keys, started("before"))
    follower = OutputFollower(redis, keys, "r4", events_after=tail, block_ms=2000)
    written: list[str] = []

    async def task() -> None:
        await anyio.sleep(0.2)
        written.append(await event(redis, keys, started("r4")))
        await event(redis, keys, started("other"))
        written.append(await chunk(redis, keys, "r4", 1))
        await anyio.sleep(0.1)
        written.append(await chunk(redis, keys, "r4", 2))
        written.append(await commit(redis, keys, "r4", succeeded("r4")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(task)
        items = flat(await batches(follower))
    assert [item.entry_id for item in items] == written
    assert [type(item).__name__ for item in items] == ["FollowedEvent", "Chunk", "Chunk", "End"]
    first, end = items[0], items[-1]
    assert isinstance(first, FollowedEvent) and first.event.request_id == "r4"
    assert isinstance(end, End) and isinstance(end.event(), TaskSucceeded)  # the events stream's


async def test_chunks_not_read_yet_come_before_the_terminal_event(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A read that meets the terminal event first still hands over every chunk before it."""
    written = [await chunk(redis, keys, "r5", n) for n in range(3)]
    terminal = await event(redis, keys, succeeded("r5"))
    follower = OutputFollower(
        redis, keys, "r5", after=written[0], events_after=START, block_ms=100, count=1
    )
    items = flat(await batches(follower))
    assert [item.entry_id for item in items] == [*written[1:], terminal]


class Flaky:
    """A Redis client whose next calls of some commands fail as in an outage."""

    def __init__(self, real: aioredis.Redis) -> None:
        self.real = real
        self.fail: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.real, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.fail.get(name):
                self.fail[name] -= 1
                raise RedisConnectionError("Connection closed by server.")
            return await method(*args, **kwargs)

        return call


async def test_a_failed_read_resumes_where_it_was(redis: aioredis.Redis, keys: Keys) -> None:
    """The gateway keeps an open stream through a Redis outage by calling the follower again."""
    flaky = Flaky(redis)
    ids = [await chunk(redis, keys, "r6", n) for n in range(2)]
    terminal = await event(redis, keys, succeeded("r6"))
    client: Any = flaky
    for failing in ("xread", "xrange"):  # the read, or the catch-up of chunks at the end
        follower = OutputFollower(client, keys, "r6", events_after=START, block_ms=100)
        flaky.fail = {failing: 1}
        with pytest.raises(RedisConnectionError):
            await anext(follower)
        assert follower.cursor == START and not follower.ended
        items = flat(await batches(follower))
        assert [item.entry_id for item in items] == [*ids, terminal], failing


def test_parse_output_stops_at_the_end() -> None:
    entries: list[tuple[str, dict[Any, bytes]]] = [
        ("1-0", {b"chunk": b"1"}),
        ("2-0", {"end": b"{}"}),
        ("3-0", {b"chunk": b"3"}),
    ]
    assert parse_output(entries) == [Chunk("1-0", b"1"), End("2-0", b"{}")]
    assert parse_output([("4-0", {b"other": b"x"})]) == []
