"""Takeover keyed on an owner's silence, not on the task timeout (DESIGN §5).

An entry's idle time is how long its owner has been silent about it: owners refresh it every
sixth of ``PLUGIND_TAKEOVER_AFTER``. So a dead node's entries are taken over once that much
silence has passed, whatever ``PLUGIN_TASK_TIMEOUT`` says, and a live node's never are, however
long they run. Settings that would break this are refused at start.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from plugind.bus.consumer import StreamConsumer
from plugind.bus.delivery import Delivery
from plugind.bus.groups import ensure_group
from plugind.bus.keys import WORKERS_GROUP, Keys
from plugind.bus.nodes import claim_node_name, report_ttl_ms
from plugind.config import Settings, check_settings, load_settings
from plugind.errors import ConfigError

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------ settings


def test_the_keepalive_is_derived_from_the_takeover() -> None:
    settings = load_settings({"PLUGIN_TASK_TIMEOUT": "600"})
    assert settings.takeover_after == 30 and settings.keepalive_interval == 5
    assert load_settings({"PLUGIND_TAKEOVER_AFTER": "12"}).keepalive_interval == 2


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"PLUGIND_TAKEOVER_AFTER": "1"}, "PLUGIND_TAKEOVER_AFTER must be between 2 and 3600"),
        ({"PLUGIND_TAKEOVER_AFTER": "7200"}, "PLUGIND_TAKEOVER_AFTER must be between"),
        ({"PLUGIND_RECLAIM_GRACE": "30"}, "PLUGIND_RECLAIM_GRACE is no longer read"),
    ],
)
def test_settings_that_would_break_takeover_are_refused(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings(env)


def test_the_daemon_checks_settings_built_in_code_too() -> None:
    with pytest.raises(ConfigError, match="PLUGIND_TAKEOVER_AFTER"):
        check_settings(Settings(takeover_after=0.5))


# ------------------------------------------------------------------ the bus alone


def _consumer(redis: Any, keys: Keys, name: str, handler: Any, **options: Any) -> StreamConsumer:
    return StreamConsumer(
        redis, stream=keys.tasks, group=WORKERS_GROUP, consumer=name, handler=handler, **options
    )


async def test_slow_entries_of_a_live_consumer_are_never_taken_over(redis: Any, keys: Keys) -> None:
    """Entries running ten times the takeover period stay with their live owner."""
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    ids = [(await redis.xadd(keys.tasks, {"cmd": f"{i}"})).decode() for i in range(4)]
    runs: list[tuple[str, str]] = []

    def handler(name: str) -> Any:
        async def run(delivery: Delivery) -> None:
            runs.append((name, delivery.entry_id))
            await anyio.sleep(3.0)  # ten takeover periods
            await redis.xack(delivery.stream, WORKERS_GROUP, delivery.entry_id)

        return run

    options: dict[str, Any] = {"concurrency": 2, "block_ms": 50, "takeover_after_s": 0.3}
    first = _consumer(redis, keys, "first", handler("first"), **options)
    second = _consumer(redis, keys, "second", handler("second"), **options)
    async with anyio.create_task_group() as tg:
        await tg.start(first.run)
        await tg.start(second.run)
        with anyio.fail_after(15):
            while (await redis.xpending(keys.tasks, WORKERS_GROUP))["pending"] or len(runs) < 4:
                await anyio.sleep(0.05)
        first.stop()
        second.stop()
    assert sorted(entry for _node, entry in runs) == sorted(ids), runs  # each ran once
    assert first.taken_over == second.taken_over == 0


async def test_a_silent_owners_entries_are_taken_over_after_the_takeover_period(
    redis: Any, keys: Keys
) -> None:
    """Nothing about the task's timeout: silence of the owner for ``takeover_after_s``."""
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    [entry] = [(await redis.xadd(keys.tasks, {"cmd": "x"})).decode() for _ in range(1)]
    await redis.xreadgroup(WORKERS_GROUP, "dead", {keys.tasks: ">"}, count=1)  # then it died
    read_at = time.monotonic()
    ran: list[tuple[str, int, float]] = []

    async def handler(delivery: Delivery) -> None:
        ran.append((delivery.entry_id, delivery.deliveries, time.monotonic() - read_at))
        await redis.xack(delivery.stream, WORKERS_GROUP, delivery.entry_id)

    live = _consumer(redis, keys, "live", handler, concurrency=2, takeover_after_s=1.2)
    async with anyio.create_task_group() as tg:
        await tg.start(live.run)
        with anyio.fail_after(10):
            while not ran:
                await anyio.sleep(0.02)
        live.stop()
    [(taken, deliveries, after)] = ran
    assert (taken, deliveries) == (entry, 2)
    assert 1.2 <= after < 1.2 + 1.2 / 12 + 0.5, after  # the period, plus at most one scan
    assert live.taken_over == 1


# ------------------------------------------------------------------ node names


async def test_a_node_name_in_use_by_a_live_node_is_refused(redis: Any, keys: Keys) -> None:
    from plugind.bus.nodes import run_reports
    from plugind.runtime.pool import PoolSnapshot

    empty = PoolSnapshot(plugins=(), processes=0, in_flight=0, restarts=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: run_reports(
                redis, keys, node="n1", version="x", snapshot=lambda: empty, interval=0.2
            )
        )
        await anyio.sleep(0.1)
        with pytest.raises(ConfigError, match="PLUGIND_NODE=n1 is the name of a live node"):
            await claim_node_name(redis, keys, "n1", interval=0.2)
        await claim_node_name(redis, keys, "n2", interval=0.2)  # a free name: at once
        tg.cancel_scope.cancel()


async def test_a_dead_nodes_leftover_report_delays_its_name_by_its_ttl_at_most(
    redis: Any, keys: Keys
) -> None:
    await redis.hset(keys.node("n1"), mapping={"at": "then"})
    await redis.pexpire(keys.node("n1"), report_ttl_ms(0.2))  # 1 s: what a crash leaves
    started = time.monotonic()
    await claim_node_name(redis, keys, "n1", interval=0.2)
    assert time.monotonic() - started < 2.5


async def test_consumers_of_nodes_long_gone_are_forgotten(redis: Any, keys: Keys) -> None:
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    await redis.xadd(keys.tasks, {"cmd": "x"})
    await redis.xreadgroup(WORKERS_GROUP, "holds-one", {keys.tasks: ">"}, count=1)
    await redis.xgroup_createconsumer(keys.tasks, WORKERS_GROUP, "gone")  # a node that ended
    consumer = _consumer(redis, keys, "live", lambda d: None, concurrency=1)
    await anyio.sleep(0.05)
    assert await consumer.forget_gone_consumers(idle_s=0.01) == ["gone"]
    names = {c["name"].decode() for c in await redis.xinfo_consumers(keys.tasks, WORKERS_GROUP)}
    assert names == {"holds-one"}  # its entry is still pending: kept for a takeover
