"""Concurrent commands share round trips; each caller still gets its own reply or error."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
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
