"""Concurrent commands share round trips; each caller still gets its own reply or error."""

from __future__ import annotations

import gc
from typing import Any

import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from plugind.bus.autopipeline import AutoPipeline
from plugind.bus.keys import Keys

pytestmark = pytest.mark.anyio


async def test_concurrent_commands_are_coalesced(redis: Any, keys: Keys) -> None:
    pipeline = AutoPipeline(redis)
    replies: dict[int, Any] = {}

    async def incr(i: int) -> None:
        replies[i] = await pipeline.execute("INCR", keys.done(f"n{i % 3}"))

    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.run)
        async with anyio.create_task_group() as callers:
            for i in range(300):
                callers.start_soon(incr, i)
        tg.cancel_scope.cancel()
    assert pipeline.commands == 300
    assert pipeline.flushes < 30
    assert sorted(replies.values()) == sorted(n for _ in range(3) for n in range(1, 101))


async def test_an_error_reaches_only_its_caller(redis: Any, keys: Keys) -> None:
    pipeline = AutoPipeline(redis)
    await redis.set(keys.done("s"), "text")
    outcomes: dict[str, Any] = {}

    async def run(name: str, *command: Any) -> None:
        try:
            outcomes[name] = await pipeline.execute(*command)
        except ResponseError as exc:
            outcomes[name] = exc

    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.run)
        async with anyio.create_task_group() as callers:
            callers.start_soon(run, "bad", "HGET", keys.done("s"), "field")
            callers.start_soon(run, "good", "GET", keys.done("s"))
        tg.cancel_scope.cancel()
    assert isinstance(outcomes["bad"], ResponseError) and "WRONGTYPE" in str(outcomes["bad"])
    assert outcomes["good"] == b"text"


async def test_without_a_flusher_commands_go_straight(redis: Any, keys: Keys) -> None:
    pipeline = AutoPipeline(redis)
    assert await pipeline.execute("SET", keys.done("x"), "1") is True
    assert pipeline.flushes == 0


async def test_a_flushed_script_is_loaded_again(redis: Any, keys: Keys) -> None:
    source = "return redis.call('INCR', KEYS[1])"
    sha = redis.register_script(source).sha
    await redis.script_flush()
    pipeline = AutoPipeline(redis)
    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.run)
        assert await pipeline.evalsha(sha, source, [keys.done("c")], []) == 1
        tg.cancel_scope.cancel()


async def test_submitted_commands_leave_together_and_in_order(redis: Any, keys: Keys) -> None:
    pipeline = AutoPipeline(redis)
    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.run)
        first = pipeline.submit("SET", keys.done("o"), "a")
        second = pipeline.submit("APPEND", keys.done("o"), "b")
        third = pipeline.submit("GET", keys.done("o"))
        assert await third == b"ab"  # awaited out of order, run in order
        assert await first is True and await second == 2
        tg.cancel_scope.cancel()
    assert (pipeline.flushes, pipeline.commands) == (1, 3)


async def test_a_submitted_command_is_retried_after_a_dropped_connection(
    redis: Any, keys: Keys
) -> None:
    pipeline = AutoPipeline(redis)
    dropped: list[Any] = []

    def fault(command: Any, sent: bool) -> BaseException | None:
        if not sent and not dropped:
            dropped.append(command)
            return RedisConnectionError("Connection closed by server.")
        return None

    pipeline.fault = fault
    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.run)
        reply = pipeline.submit("INCR", keys.done("r"))
        assert await reply == 1
        tg.cancel_scope.cancel()
    assert dropped and await redis.get(keys.done("r")) == b"1"


async def test_a_reply_nobody_awaits_is_dropped_quietly(redis: Any, keys: Keys) -> None:
    pipeline = AutoPipeline(redis)
    await redis.set(keys.done("s"), "text")
    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.run)
        pipeline.submit("HGET", keys.done("s"), "field")  # fails (WRONGTYPE), never awaited
        assert await pipeline.execute("GET", keys.done("s")) == b"text"
        tg.cancel_scope.cancel()
    gc.collect()  # an unretrieved future exception would be reported (an error under pytest)


async def test_without_a_flusher_a_submitted_command_is_sent_when_awaited(
    redis: Any, keys: Keys
) -> None:
    pipeline = AutoPipeline(redis)
    reply = pipeline.submit("SET", keys.done("late"), "1")
    assert await redis.get(keys.done("late")) is None
    assert await reply is True
