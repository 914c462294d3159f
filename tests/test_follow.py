"""Following the events stream: the one follower behind ``Client.wait``, SSE and ``--follow``."""

from __future__ import annotations

import argparse
from typing import Any

import anyio
import orjson
import pytest
import redis.asyncio as aioredis

from plugind.bus.codec import text
from plugind.bus.follow import START, EventFollower, FollowedEvent, event_at, events_tail
from plugind.bus.keys import Keys
from plugind.client import Client, WaitTimeout
from plugind.config import Settings
from plugind.messages import (
    EventFactory,
    TaskResult,
    TaskStarted,
    TaskSucceeded,
    decode_event,
    encode,
)

pytestmark = pytest.mark.anyio
ev = EventFactory("test-node")


def started(rid: str, plugin: str = "acme/calc") -> TaskStarted:
    return ev(
        TaskStarted,
        request_id=rid,
        tenant_id="t1",
        plugin_id=plugin,
        identifier=f"{plugin}:0.1.0@abc",
        access="tool",
        action="invoke_tool",
        attempt=1,
    )


def succeeded(rid: str) -> TaskSucceeded:
    return ev(
        TaskSucceeded,
        request_id=rid,
        tenant_id="t1",
        plugin_id="acme/calc",
        result=TaskResult(chunks=[{"value": 1}]),
        duration_ms=1.0,
    )


async def append(redis: aioredis.Redis, keys: Keys, *events: Any) -> list[str]:
    ids = []
    for event in events:
        raw = event if isinstance(event, bytes) else encode(event)
        ids.append(text(await redis.xadd(keys.events, {"event": raw})))
    return ids


async def take(follower: EventFollower, n: int, timeout: float = 5) -> list[FollowedEvent | None]:
    """The follower's next ``n`` items, quiet-period ``None``s included."""
    out: list[FollowedEvent | None] = []
    with anyio.fail_after(timeout):
        async for item in follower:
            out.append(item)
            if len(out) == n:
                break
    return out


async def events(follower: EventFollower, n: int, timeout: float = 5) -> list[FollowedEvent]:
    """The follower's next ``n`` events, quiet periods skipped."""
    out: list[FollowedEvent] = []
    with anyio.fail_after(timeout):
        async for item in follower:
            if item is not None:
                out.append(item)
                if len(out) == n:
                    break
    return out


async def test_following_from_the_tail_sees_only_what_comes_after(
    redis: aioredis.Redis, keys: Keys
) -> None:
    assert await events_tail(redis, keys) == START
    await append(redis, keys, started("old"))
    follower = EventFollower(redis, keys, block_ms=50)
    async with anyio.create_task_group() as tg:

        async def later() -> None:
            await anyio.sleep(0.2)  # the follower is blocked on its first read by then
            await append(redis, keys, started("new"), succeeded("new"))

        tg.start_soon(later)
        seen = await events(follower, 2)
    assert [(f.event.request_id, type(f.event).__name__) for f in seen] == [
        ("new", "TaskStarted"),
        ("new", "TaskSucceeded"),
    ]
    assert follower.cursor == seen[-1].entry_id
    assert decode_event(seen[0].raw) == seen[0].event


async def test_one_request_is_picked_out_of_the_traffic_and_garbage(
    redis: aioredis.Redis, keys: Keys
) -> None:
    awkward = 'r "quoted" \\ ü'  # JSON escapes it: matched after decoding, not by bytes
    for rid in ("r1", awkward):
        ids = await append(
            redis,
            keys,
            started("r10"),
            b"not json " + rid.encode(),
            b'{"type": "task.exploded", "request_id": "' + rid.encode() + b'"}',
            started(rid),
            started("r1" + rid),
            succeeded(rid),
        )
        follower = EventFollower(redis, keys, after=START, request_id=rid, block_ms=None)
        seen = [item async for item in follower if item is not None]
        assert [f.entry_id for f in seen] == [ids[3], ids[5]]
        assert {f.event.request_id for f in seen} == {rid}
        await redis.delete(keys.events)


async def test_quiet_periods_are_reported_even_under_other_traffic(
    redis: aioredis.Redis, keys: Keys
) -> None:
    follower = EventFollower(redis, keys, request_id="mine", block_ms=100)
    stop = anyio.Event()

    async def noise() -> None:
        while not stop.is_set():
            await append(redis, keys, started("theirs"))
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(noise)
        started_at = anyio.current_time()
        assert await take(follower, 2) == [None, None]
        elapsed = anyio.current_time() - started_at
        stop.set()
    assert 0.2 <= elapsed < 1.5


async def test_until_ends_the_iteration_and_no_block_ends_when_caught_up(
    redis: aioredis.Redis, keys: Keys
) -> None:
    deadline = anyio.current_time() + 0.3
    with anyio.fail_after(3):
        items = [item async for item in EventFollower(redis, keys, until=deadline, block_ms=100)]
    assert all(item is None for item in items) and anyio.current_time() >= deadline

    ids = await append(redis, keys, *(started(f"r{i}") for i in range(7)))
    pages = EventFollower(redis, keys, after=START, block_ms=None, count=3)
    assert [f.entry_id for f in [item async for item in pages] if f is not None] == ids
    assert pages.cursor == ids[-1]
    later = EventFollower(redis, keys, after=ids[3], block_ms=None)
    assert [f.entry_id async for f in later if f is not None] == ids[4:]
    event = await event_at(redis, keys, ids[2])
    assert event is not None and event.request_id == "r2"
    assert await event_at(redis, keys, "1-0") is None


async def test_client_wait_and_events_of(redis: aioredis.Redis, keys: Keys) -> None:
    client = Client(redis, keys)
    await append(redis, keys, started("before"))
    seen: list[str] = []

    async def end_it() -> None:
        await anyio.sleep(0.2)
        await append(redis, keys, started("r1"), started("other"), succeeded("r1"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(end_it)
        client._cursors["r1"] = await events_tail(redis, keys)
        terminal = await client.wait("r1", timeout=5, on_event=lambda e: seen.append(e.request_id))
    assert isinstance(terminal, TaskSucceeded) and seen == ["r1"]
    assert [type(e).__name__ for e in await client.events_of("r1")] == [
        "TaskStarted",
        "TaskSucceeded",
    ]
    assert [e.request_id for _id, e in [x async for x in client.iter_events()]][:1] == ["before"]
    with pytest.raises(WaitTimeout):
        await client.wait("never", timeout=0.3)


async def test_cli_events_follow(
    redis: aioredis.Redis, keys: Keys, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    from plugind.cli.commands import cmd_events

    args = argparse.Namespace(
        settings=settings,
        follow=True,
        type_="task.started",
        plugin="acme/calc",
        request=None,
        since=None,
        limit=100,
        json=True,
    )
    await append(redis, keys, started("before"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(cmd_events, args)
        await anyio.sleep(0.3)
        await append(
            redis,
            keys,
            started("r1", plugin="acme/calc:0.1.0@abc"),
            succeeded("r1"),
            started("r2", plugin="acme/other"),
            started("r3"),
        )
        out = ""
        with anyio.fail_after(10):
            while out.count("\n") < 2:
                await anyio.sleep(0.05)
                out += capsys.readouterr().out
        tg.cancel_scope.cancel()
    assert [orjson.loads(line)["request_id"] for line in out.splitlines()] == ["r1", "r3"]
