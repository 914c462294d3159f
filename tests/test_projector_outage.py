"""The projector rides out Postgres going away: its run loop never dies, nothing is lost or doubled.

Two ways Postgres goes away: its backends are killed (a restart, a failover, an operator's
``pg_terminate_backend``), and the network to it is cut for a while (connections reset, new ones
refused), which a TCP forwarder in front of the test database stands in for.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import asyncpg
import pytest
import redis.asyncio as aioredis
from anyio.abc import SocketStream, TaskGroup

from plugind.bus.keys import PROJECTOR_GROUP, Keys
from plugind.messages import EventFactory, TaskStarted, encode
from plugind.projections._db import create_pool
from plugind.projections.hashchain import verify_event_log
from plugind.projections.projector import Projector

pytestmark = pytest.mark.anyio
ev = EventFactory("test-node")
LOGGER = "plugind.projections.projector"


def started(rid: str) -> TaskStarted:
    return ev(
        TaskStarted,
        request_id=rid,
        tenant_id="t1",
        plugin_id="acme/calc",
        identifier="acme/calc:0.1.0@abc",
        access="tool",
        action="invoke_tool",
        attempt=1,
    )


async def publish(redis: aioredis.Redis, keys: Keys, *rids: str) -> None:
    for rid in rids:
        await redis.xadd(keys.events, {"event": encode(started(rid))})


async def logged(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch("SELECT request_id FROM event_log ORDER BY position")
    return [r["request_id"] for r in rows]


async def wait_logged(pool: asyncpg.Pool, count: int, timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while len(await logged(pool)) < count:
            await anyio.sleep(0.05)


async def assert_each_event_once(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, rids: list[str]
) -> None:
    assert await logged(pool) == rids
    positions = [r["position"] for r in await pool.fetch("SELECT position FROM event_log")]
    assert sorted(positions) == list(range(1, len(rids) + 1))
    async with pool.acquire() as conn:
        assert (await verify_event_log(conn)).ok
    with anyio.fail_after(5):  # the ack follows the commit
        while (await redis.xpending(keys.events, PROJECTOR_GROUP))["pending"]:
            await anyio.sleep(0.02)


async def kill_backends(database_url: str) -> int:
    """Terminate every other session on the test database, the projector's lock holder included."""
    admin = await asyncpg.connect(database_url)
    try:
        killed = await admin.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()) AS k"
        )
    finally:
        await admin.close()
    return int(killed)


async def test_killed_connections_do_not_stop_the_projector(
    redis: aioredis.Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    projector = Projector(redis, pool, keys, "node-a", block_ms=20)
    rids = [f"r{i}" for i in range(6)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(projector.run)
        await publish(redis, keys, *rids[:3])
        await wait_logged(pool, 3)

        assert await kill_backends(database_url) >= 1
        await publish(redis, keys, *rids[3:])
        await wait_logged(pool, 6)
        assert projector.active

        # Kill again while events keep coming: each batch is committed once, whatever fails.
        for round_ in range(5):
            more = [f"k{round_}-{i}" for i in range(20)]
            rids += more
            await publish(redis, keys, *more[:10])
            await kill_backends(database_url)
            await publish(redis, keys, *more[10:])
            await anyio.sleep(0.05)
        await wait_logged(pool, len(rids))
        assert projector.active
        tg.cancel_scope.cancel()
    assert not projector.active

    await assert_each_event_once(redis, pool, keys, rids)
    mine = [r for r in caplog.records if r.name == LOGGER]
    lost = [r for r in mine if r.levelno == logging.WARNING]
    back = [r for r in mine if "again after" in r.getMessage()]
    assert lost and len(lost) == len(back), [r.getMessage() for r in mine]
    assert not [r for r in mine if r.levelno >= logging.ERROR]


class TcpCutter:
    """A TCP forwarder to Postgres that can be cut (connections reset, new ones refused)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._scope: anyio.CancelScope | None = None

    async def up(self, tg: TaskGroup) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        scope = self._scope = anyio.CancelScope()

        async def serve() -> None:
            with scope:
                async with listener:
                    await listener.serve(self._forward)

        tg.start_soon(serve)

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _forward(self, client: SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.target_port) as server:

            async def pump(source: Any, sink: Any) -> None:
                async for data in source:
                    await sink.send(data)
                tg.cancel_scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, client, server)
                tg.start_soon(pump, server, client)


def _through(url: str, port: int) -> str:
    scheme, _, rest = url.partition("://")
    userinfo, _, hostpath = rest.rpartition("@")
    _hostport, _, path = hostpath.partition("/")
    return f"{scheme}://{userinfo}@127.0.0.1:{port}/{path}"


async def test_a_postgres_outage_is_logged_once_and_ridden_out(
    redis: aioredis.Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = int(database_url.rpartition("@")[2].partition("/")[0].rpartition(":")[2] or 5432)
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with anyio.create_task_group() as tg:
        cutter = TcpCutter(target)
        await cutter.up(tg)
        flaky = await create_pool(_through(database_url, cutter.port), min_size=0, max_size=3)
        projector = Projector(redis, flaky, keys, "node-a", block_ms=20)
        tg.start_soon(projector.run)
        await publish(redis, keys, "a1", "a2")
        await wait_logged(pool, 2)

        cutter.down()
        await publish(redis, keys, "b1", "b2", "b3")
        await anyio.sleep(2.5)  # several retries, all refused
        assert await logged(pool) == ["a1", "a2"]
        await cutter.up(tg)
        await wait_logged(pool, 5)
        await publish(redis, keys, "c1")
        await wait_logged(pool, 6)
        assert projector.active
        tg.cancel_scope.cancel()
    await flaky.close()

    await assert_each_event_once(redis, pool, keys, ["a1", "a2", "b1", "b2", "b3", "c1"])
    mine = [r for r in caplog.records if r.name == LOGGER]
    lost = [r for r in mine if r.levelno == logging.WARNING]
    back = [r for r in mine if "again after" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in lost]
    assert "Postgres" in lost[0].getMessage()
    assert len(back) == 1 and back[0].levelno == logging.INFO
    assert not [r for r in mine if r.levelno >= logging.ERROR]
