"""The bus on a real Redis: consumer groups, concurrency, reclaim, dead letters, atomic commit."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from plugind.bus import consumer as consumer_module
from plugind.bus import scripts
from plugind.bus.autopipeline import AutoPipeline, BatchedScript
from plugind.bus.consumer import StreamConsumer
from plugind.bus.delivery import Delivery
from plugind.bus.emit import Emitter, RegistryChange
from plugind.bus.groups import ensure_group
from plugind.bus.keys import WORKERS_GROUP, Keys, installed_field, shard_namespace
from plugind.messages import EventFactory, TaskResult, TaskSucceeded, decode_event

pytestmark = pytest.mark.anyio


def _consumer(redis: Any, keys: Keys, name: str, handler: Any, **options: Any) -> StreamConsumer:
    return StreamConsumer(
        redis, stream=keys.tasks, group=WORKERS_GROUP, consumer=name, handler=handler, **options
    )


async def _run_while(consumer: StreamConsumer, busy: Any, *, timeout: float) -> None:
    """Run ``consumer`` until ``busy()`` turns false, then stop it."""
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        with anyio.fail_after(timeout):
            while busy():
                await anyio.sleep(0.01)
        consumer.stop()


async def _fill(redis: Any, stream: str, n: int) -> list[str]:
    return [(await redis.xadd(stream, {"cmd": f'{{"n": {i}}}'})).decode() for i in range(n)]


async def test_consumer_runs_every_entry_within_its_concurrency(redis: Any, keys: Keys) -> None:
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    ids = await _fill(redis, keys.tasks, 20)
    seen: list[str] = []
    running, peak = 0, 0

    async def handler(delivery: Delivery) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.02)
        running -= 1
        seen.append(delivery.entry_id)
        await redis.xack(delivery.stream, WORKERS_GROUP, delivery.entry_id)

    consumer = _consumer(redis, keys, "c1", handler, concurrency=3, block_ms=100)
    await _run_while(consumer, lambda: len(seen) < 20, timeout=10)
    assert sorted(seen) == sorted(ids)
    assert peak == 3
    assert (await redis.xpending(keys.tasks, WORKERS_GROUP))["pending"] == 0


async def test_entries_of_a_dead_consumer_are_reclaimed_then_dead_lettered(
    redis: Any, keys: Keys
) -> None:
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    [ok_id, poison_id] = await _fill(redis, keys.tasks, 2)
    # a consumer that read both entries and died
    await redis.xreadgroup(WORKERS_GROUP, "dead-node", {keys.tasks: ">"}, count=2)

    handled: list[tuple[str, int]] = []
    dead: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        handled.append((delivery.entry_id, delivery.deliveries))
        if delivery.entry_id == poison_id:
            raise RuntimeError("always fails")
        await redis.xack(delivery.stream, WORKERS_GROUP, delivery.entry_id)

    async def on_dead(delivery: Delivery) -> None:
        dead.append(delivery)
        await redis.xack(delivery.stream, WORKERS_GROUP, delivery.entry_id)

    consumer = _consumer(
        redis,
        keys,
        "c2",
        handler,
        concurrency=2,
        block_ms=50,
        takeover_after_s=0.2,
        max_deliveries=3,
        on_dead=on_dead,
    )
    await _run_while(consumer, lambda: not dead, timeout=15)
    assert (ok_id, 2) in handled  # the second delivery, taken over from the dead node
    assert [d for _id, d in handled if _id == poison_id] == [2, 3]
    assert dead[0].entry_id == poison_id and dead[0].deliveries == 3
    assert (await redis.xpending(keys.tasks, WORKERS_GROUP))["pending"] == 0


async def test_a_busy_consumer_reads_once_a_quarter_of_its_slots_is_free(
    redis: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read for several entries under load; a slot left free waits READ_LINGER_S at most."""
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    ids = await _fill(redis, keys.tasks, 30)
    release = {entry_id: anyio.Event() for entry_id in ids}
    done: list[str] = []

    async def handler(delivery: Delivery) -> None:
        await release[delivery.entry_id].wait()
        await redis.xack(delivery.stream, WORKERS_GROUP, delivery.entry_id)
        done.append(delivery.entry_id)

    async def settle(expected: int) -> None:
        with anyio.fail_after(5):
            while consumer.in_flight != expected:
                await anyio.sleep(0.005)

    monkeypatch.setattr(consumer_module, "READ_LINGER_S", 30.0)
    consumer = _consumer(redis, keys, "c1", handler, concurrency=8, block_ms=50)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await settle(8)
        release[ids[0]].set()
        await settle(7)
        await anyio.sleep(0.3)
        assert consumer.in_flight == 7  # one free slot of 8: not worth a read yet
        release[ids[1]].set()
        await settle(8)  # two of 8 free: read
        monkeypatch.setattr(consumer_module, "READ_LINGER_S", 0.05)
        release[ids[2]].set()
        await settle(7)
        await settle(8)  # a lone free slot is filled after the linger all the same
        for event in release.values():
            event.set()
        with anyio.fail_after(10):
            while len(done) < 30:
                await anyio.sleep(0.01)
        consumer.stop()
    assert sorted(done) == sorted(ids)


async def test_terminal_commit_is_once_per_request_even_when_racing(redis: Any, keys: Keys) -> None:
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    ids = await _fill(redis, keys.tasks, 5)
    await redis.xreadgroup(WORKERS_GROUP, "c", {keys.tasks: ">"}, count=5)
    emitter = Emitter(redis, keys, dedupe_ttl=60)
    make = EventFactory("n")

    async def commit(entry_id: str) -> str | None:
        event = make(
            TaskSucceeded,
            request_id="same",
            tenant_id="t",
            plugin_id="a/b",
            result=TaskResult(chunks=[]),
            duration_ms=1.0,
        )
        return await emitter.terminal(Delivery(keys.tasks, entry_id, {}), event)

    results: list[str | None] = []

    async def run(entry_id: str) -> None:
        results.append(await commit(entry_id))

    async with anyio.create_task_group() as tg:
        for entry_id in ids:
            tg.start_soon(run, entry_id)
    assert len([r for r in results if r]) == 1
    events = [decode_event(f[b"event"]) for _i, f in await redis.xrange(keys.events)]
    assert len(events) == 1
    assert (await redis.xpending(keys.tasks, WORKERS_GROUP))["pending"] == 0
    assert await redis.get(keys.done("same")) == next(r for r in results if r).encode()


async def test_registry_changes_with_the_terminal_event(redis: Any, keys: Keys) -> None:
    await ensure_group(redis, keys.install, WORKERS_GROUP)
    [entry] = await _fill(redis, keys.install, 1)
    await redis.xreadgroup(WORKERS_GROUP, "c", {keys.install: ">"}, count=1)
    emitter = Emitter(redis, keys, dedupe_ttl=60)
    event = EventFactory("n")(
        TaskSucceeded,
        request_id="r",
        tenant_id="t",
        plugin_id="a/b",
        result=TaskResult(chunks=[]),
        duration_ms=1.0,
    )
    await emitter.terminal(
        Delivery(keys.install, entry, {}),
        event,
        registry=RegistryChange("set", "t", "a/b", "a/b:1@x"),
    )
    assert await redis.hget(keys.installed, installed_field("t", "a/b")) == b"a/b:1@x"


def test_keys_share_one_hash_tag_and_shards_are_stable() -> None:
    keys = Keys("ns")
    assert {
        k.split("}")[0]
        for k in (
            keys.install,
            keys.tasks,
            keys.events,
            keys.dead,
            keys.done("r"),
            keys.out("r"),
            keys.installed,
        )
    } == {"{ns"}
    assert shard_namespace("plugind", 1, "acme/calc") == "plugind"
    assert shard_namespace("plugind", 4, "acme/calc") == shard_namespace("plugind", 4, "acme/calc")
    assert {shard_namespace("plugind", 4, f"a/p{i}") for i in range(100)} == {
        f"plugind:{i}" for i in range(4)
    }


async def test_a_restarted_consumer_runs_its_own_backlog_once(redis: Any, keys: Keys) -> None:
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    ids = await _fill(redis, keys.tasks, 7)
    await redis.xreadgroup(WORKERS_GROUP, "same-name", {keys.tasks: ">"}, count=5)  # then died
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        await anyio.sleep(0.05)
        seen.append(delivery.entry_id)
        await redis.xack(delivery.stream, WORKERS_GROUP, delivery.entry_id)

    consumer = _consumer(redis, keys, "same-name", handler, concurrency=2, block_ms=50)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        with anyio.fail_after(10):
            while len(seen) < 7:
                await anyio.sleep(0.01)
        await anyio.sleep(0.3)
        consumer.stop()
    assert sorted(seen) == sorted(ids)


async def test_a_backlog_entry_that_keeps_killing_its_node_is_dead_lettered(
    redis: Any, keys: Keys
) -> None:
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    [poison] = await _fill(redis, keys.tasks, 1)
    for _restart in range(3):  # read, then the node died before finishing, three times
        await redis.xreadgroup(WORKERS_GROUP, "node-a", {keys.tasks: "0" if _restart else ">"})
    ran: list[int] = []
    dead: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        ran.append(delivery.deliveries)

    async def on_dead(delivery: Delivery) -> None:
        dead.append(delivery)
        await redis.xack(delivery.stream, WORKERS_GROUP, delivery.entry_id)

    consumer = _consumer(
        redis,
        keys,
        "node-a",
        handler,
        concurrency=2,
        block_ms=50,
        max_deliveries=3,
        on_dead=on_dead,
    )
    await _run_while(consumer, lambda: not dead, timeout=5)
    assert ran == []
    assert dead[0].entry_id == poison and dead[0].deliveries == 3


async def test_terminal_commits_batched_in_one_call_end_each_request_once(
    redis: Any, keys: Keys
) -> None:
    """Five requests, each delivered three times, ending at once: one event per request."""
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    ids = await _fill(redis, keys.tasks, 15)
    await redis.xreadgroup(WORKERS_GROUP, "c", {keys.tasks: ">"}, count=15)
    emitter = Emitter(redis, keys, dedupe_ttl=60)
    await redis.script_load(scripts.TERMINAL_COMMIT_MANY)
    script_calls: list[int] = []

    def watch(command: Any, sent: bool) -> None:
        if command[0] in ("EVALSHA", "EVAL") and not sent:
            script_calls.append(int(command[2]) // scripts.TERMINAL_COMMIT_KEYS)

    emitter.pipeline.fault = watch
    make = EventFactory("n")
    results: dict[str, list[str | None]] = {}

    async def commit(entry_id: str, request_id: str) -> None:
        event = make(
            TaskSucceeded,
            request_id=request_id,
            tenant_id="t",
            plugin_id="a/b",
            result=TaskResult(chunks=[]),
            duration_ms=1.0,
        )
        reply = await emitter.terminal(Delivery(keys.tasks, entry_id, {}), event)
        results.setdefault(request_id, []).append(reply)

    async with anyio.create_task_group() as tg:
        await tg.start(emitter.pipeline.run)
        async with anyio.create_task_group() as callers:
            for i, entry_id in enumerate(ids):
                callers.start_soon(commit, entry_id, f"r{i % 5}")
        tg.cancel_scope.cancel()
    assert script_calls == [15]  # one script call for the lot
    events = [decode_event(f[b"event"]) for _i, f in await redis.xrange(keys.events)]
    assert sorted(e.request_id for e in events) == [f"r{i}" for i in range(5)]
    for request_id, replies in results.items():
        committed = [r for r in replies if r]
        assert len(replies) == 3 and len(committed) == 1, (request_id, replies)
        assert await redis.get(keys.done(request_id)) == committed[0].encode()
    assert (await redis.xpending(keys.tasks, WORKERS_GROUP))["pending"] == 0


async def test_a_batched_script_unknown_to_redis_runs_from_source(redis: Any, keys: Keys) -> None:
    script = BatchedScript(
        f"-- {keys.namespace}\n"
        "local r = {} for i = 1, #KEYS do r[i] = redis.call('INCRBY', KEYS[i], ARGV[i]) end "
        "return r",
        keys_per_call=1,
        args_per_call=1,
    )
    pipeline = AutoPipeline(redis)
    replies: dict[int, Any] = {}

    async def call(n: int) -> None:
        replies[n] = await pipeline.call_batched(script, [keys.done(f"k{n}")], [n])

    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.run)
        async with anyio.create_task_group() as callers:
            for n in range(1, 6):
                callers.start_soon(call, n)
        assert await pipeline.call_batched(script, [keys.done("k1")], [10]) == 11  # cached now
        tg.cancel_scope.cancel()
    assert replies == {n: n for n in range(1, 6)}
