"""Dependency outages: the daemon outlives them, and work resumes as soon as they end.

Redis and Postgres here are servers of the test's own (embedded Valkey with AOF, embedded
Postgres, each pinned to one port) that the test stops, kills and starts again; the shared
services of the other tests are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from e2e import eventually
from plugin_factory import package_bytes, write_plugin
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from plugind.bus.autopipeline import AutoPipeline, Command
from plugind.bus.codec import text
from plugind.bus.consumer import StreamConsumer
from plugind.bus.delivery import Delivery
from plugind.bus.groups import ensure_group
from plugind.bus.keys import WORKERS_GROUP, Keys
from plugind.client import Client
from plugind.config import Settings
from plugind.daemon import running_daemon
from plugind.embedded import EmbeddedServer, start_embedded_postgres, start_embedded_redis
from plugind.embedded.process import processes_in
from plugind.messages import (
    TERMINAL_EVENT_TYPES,
    Installed,
    InstallFailed,
    TaskSucceeded,
)
from plugind.outage import Dependency, is_postgres_outage, is_redis_outage, retry_redis

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tester_package(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return package_bytes(write_plugin(tmp_path_factory.mktemp("tester"), name="tester"))


@pytest.fixture
def server_root() -> Iterator[Path]:
    # outside pytest's basetemp: as root, Postgres runs as a user who must traverse to its dir
    path = Path(tempfile.mkdtemp(prefix="plugind-outages-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Restartable:
    """An embedded server the test stops, kills and starts again, always on the same port."""

    def __init__(self, kind: str, data_dir: Path) -> None:
        self.kind = kind
        self.data_dir = data_dir
        self.port = _free_port()
        self.server: EmbeddedServer | None = None

    async def start(self) -> str:
        if self.kind == "valkey":
            server = await anyio.to_thread.run_sync(
                lambda: start_embedded_redis(
                    self.data_dir, port=self.port, config={"appendfsync": "always"}
                )
            )
        else:
            server = await anyio.to_thread.run_sync(
                lambda: start_embedded_postgres(self.data_dir, port=self.port)
            )
        self.server = server
        return server.url

    async def stop(self) -> None:
        """A clean stop (SIGTERM for Valkey: it fsyncs its AOF; ``pg_ctl stop -m fast``)."""
        if self.server is not None:
            await anyio.to_thread.run_sync(self.server.stop)
            self.server = None

    async def kill(self) -> None:
        """SIGKILL, no chance to flush anything."""
        name = "valkey-server" if self.kind == "valkey" else "postgres"
        for process in processes_in(self.data_dir, name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        await self.stop()  # reaps and releases the data dir's lock


@pytest.fixture
async def own_redis(server_root: Path) -> AsyncIterator[Restartable]:
    valkey = Restartable("valkey", server_root / "valkey")
    await valkey.start()
    try:
        yield valkey
    finally:
        await valkey.stop()


@pytest.fixture
async def own_postgres(server_root: Path) -> AsyncIterator[Restartable]:
    postgres = Restartable("postgres", server_root / "postgres")
    await postgres.start()
    try:
        yield postgres
    finally:
        await postgres.stop()


def _fast(settings: Settings, **changes: Any) -> Settings:
    # enough slots for a 50/s flow plus sleepers; the default takeover (30 s of silence) is far
    # beyond the outages here, which shows that nothing needs one
    return replace(settings, worker_count=16, **changes)


class Traffic:
    """Tasks published at about 50/s by a producer with a client of its own."""

    def __init__(self, redis_url: str, keys: Keys) -> None:
        # like the daemon's: quick retries absorb the stale connections a restart leaves
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            redis_url,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
            retry_on_error=[RedisConnectionError],
        )
        self.client = Client(self.redis, keys)
        self.acknowledged: dict[str, float] = {}  # request id -> wall time its XADD returned
        self.refused = 0
        self._n = 0

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.send()
            await anyio.sleep(0.02)

    async def send(self, tool: str = "echo", **parameters: Any) -> str | None:
        self._n += 1
        rid = f"{tool}-{self._n}"
        try:
            await self.client.invoke_tool(
                "acme/tester", "tester", tool, parameters or {"n": self._n}, request_id=rid
            )
        except RedisError:
            self.refused += 1
            return None
        self.acknowledged[rid] = time.time()
        return rid

    async def terminal_events(self) -> dict[str, list[int]]:
        """Each request's terminal events, as the ms timestamps of their stream ids."""
        found: dict[str, list[int]] = {}
        async for entry_id, event in self.client.iter_events():
            if event.__struct_config__.tag in TERMINAL_EVENT_TYPES:
                found.setdefault(event.request_id, []).append(int(entry_id.split("-")[0]))
        return found

    async def all_ended(self, timeout: float) -> dict[str, list[int]]:
        with anyio.fail_after(timeout):
            while True:
                ended = await self.terminal_events()
                if all(rid in ended for rid in self.acknowledged):
                    return ended
                await anyio.sleep(0.2)


async def _health(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await client.get("/health")
    body: dict[str, Any] = response.json()
    return response.status_code, body


async def _until_health(client: httpx.AsyncClient, status: int, timeout: float) -> float:
    """Seconds until /health answers ``status``."""
    started = time.monotonic()
    with anyio.fail_after(timeout):
        while (await _health(client))[0] != status:
            await anyio.sleep(0.02)
    return time.monotonic() - started


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# --------------------------------------------------------------------------- units


def test_an_outage_is_logged_once_per_change_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    redis = Dependency("Redis", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="plugind.outage"):
        redis.ok()
        for _ in range(5):
            redis.failed(RedisConnectionError("Connection refused"))
            now[0] += 2.5
        assert redis.down and redis.down_for == 12.5 and redis.down_seconds == 12.5
        redis.ok()
        redis.ok()
    assert [r.getMessage() for r in caplog.records] == [
        "Redis unreachable: ConnectionError: Connection refused; retrying",
        "Redis reachable again after 12.5s",
    ]
    assert redis.outages == 1 and not redis.down and redis.down_seconds == 12.5


def test_outage_errors_are_told_from_other_errors() -> None:
    from redis.exceptions import BusyLoadingError, NoScriptError, ResponseError

    assert is_redis_outage(BusyLoadingError("Redis is loading the dataset in memory"))
    assert is_redis_outage(RedisConnectionError("Connection closed by server."))
    assert not is_redis_outage(NoScriptError("No matching script"))
    assert not is_redis_outage(ResponseError("WRONGTYPE Operation against a key"))
    assert is_postgres_outage(ConnectionRefusedError(111, "Connect call failed"))
    assert is_postgres_outage(asyncpg.exceptions.AdminShutdownError("terminating connection"))
    assert is_postgres_outage(asyncpg.exceptions.CannotConnectNowError("shutting down"))
    assert not is_postgres_outage(asyncpg.exceptions.UndefinedTableError("no such table"))


async def test_a_retry_rides_out_a_stale_connection_and_a_lost_script_cache(
    redis: aioredis.Redis, keys: Keys
) -> None:
    pipeline = AutoPipeline(redis)
    failures = iter([RedisConnectionError("Connection closed by server.")])

    def fault(command: Command, sent: bool) -> BaseException | None:
        return next(failures, None) if not sent else None

    pipeline.fault = fault
    source = "return redis.call('INCR', KEYS[1])"
    sha = redis.register_script(source).sha
    await redis.script_flush()
    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.run)
        assert await pipeline.evalsha(sha, source, [keys.done("c")], []) == 1
        assert await pipeline.evalsha(sha, source, [keys.done("c")], []) == 2
        tg.cancel_scope.cancel()
    assert await redis.script_exists(sha) == [True]  # EVAL cached it again
    assert not pipeline.outage.down  # a single failure is retried at once, not an outage


async def test_retry_redis_waits_for_redis_and_other_errors_raise() -> None:
    state = Dependency("Redis")
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise RedisConnectionError("Error 111 connecting")
        return "done"

    assert await retry_redis(flaky, state) == "done"
    assert calls == 4 and state.outages == 1 and not state.down

    async def wrong() -> None:
        raise ValueError("not an outage")

    with pytest.raises(ValueError):
        await retry_redis(wrong, state)


async def test_retention_skips_rounds_while_postgres_is_down(
    redis: aioredis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    from plugind.bus.retention import run_retention
    from plugind.outage import Outages

    dead = await asyncpg.create_pool(
        f"postgresql://postgres@127.0.0.1:{_free_port()}/x", min_size=0
    )
    outages = Outages()
    caplog.set_level(logging.WARNING)
    try:
        with anyio.move_on_after(0.5):
            await run_retention(redis, dead, keys, retention_s=60, every_s=0.05, outages=outages)
    finally:
        await dead.close()
    assert outages.postgres.down and not outages.redis.down
    assert len(_lines(caplog, "Postgres unreachable")) == 1


async def test_after_an_outage_a_consumer_runs_what_redis_delivered_unheard(
    redis: aioredis.Redis, keys: Keys
) -> None:
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.entry_id)
        await redis.xack(delivery.stream, WORKERS_GROUP, delivery.entry_id)

    consumer = StreamConsumer(
        redis,
        stream=keys.tasks,
        group=WORKERS_GROUP,
        consumer="c1",
        handler=handler,
        concurrency=4,
        block_ms=100,
    )  # takeover after the default 30 s of silence: far beyond this test
    real_read = consumer._read
    lost: list[str] = []

    async def read(start: str, count: int) -> Any:
        if start == ">" and not lost:
            # Redis hands the next entry to c1, but the reply is lost with the connection
            lost.append(text(await redis.xadd(keys.tasks, {"cmd": "{}"})))
            await redis.xreadgroup(WORKERS_GROUP, "c1", {keys.tasks: ">"}, count=1)
            raise RedisConnectionError("Connection closed by server.")
        return await real_read(start, count)

    consumer._read = read  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        with anyio.fail_after(5):
            while not lost or lost[0] not in seen:
                await anyio.sleep(0.01)
        consumer.stop()
    assert (await redis.xpending(keys.tasks, WORKERS_GROUP))["pending"] == 0


# --------------------------------------------------------------------------- fault injection


@pytest.mark.parametrize("lost", ["request", "reply"])
async def test_a_commit_that_loses_its_connection_is_retried_at_once(
    settings: Settings,
    redis: aioredis.Redis,
    tester_package: bytes,
    lost: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_daemon(settings, shutdown_grace_s=5) as daemon:
        client = Client(redis, daemon.keys)
        installed = await client.wait(await client.install(tester_package), timeout=300)
        assert isinstance(installed, Installed), installed
        assert daemon.emitter is not None
        injected: list[Command] = []

        def fault(command: Command, sent: bool) -> BaseException | None:
            # the first terminal commit's connection drops: before Redis got it, or after it
            # ran (the ambiguous case: the retry must not append a second terminal event)
            if command[0] in ("EVALSHA", "EVAL") and not injected and sent == (lost == "reply"):
                injected.append(command)
                return RedisConnectionError("Connection closed by server.")
            return None

        daemon.emitter.pipeline.fault = fault
        started = time.monotonic()
        rid = await client.invoke_tool("acme/tester", "tester", "echo", {"n": 1})
        done = await client.wait(rid, timeout=10)
        assert isinstance(done, TaskSucceeded), done
        with anyio.fail_after(3):  # the handler is done too (the event shows up before that)
            while any(c.in_flight for c in daemon.consumers):
                await anyio.sleep(0.01)
        assert time.monotonic() - started < 3  # at once, not after a takeover (30 s)
        assert injected, "the fault hook never fired"
        events = [e.__struct_config__.tag for e in await client.events_of(rid)]
        assert events.count("task.succeeded") == 1, events
        assert (await redis.xpending(daemon.keys.tasks, "workers"))["pending"] == 0
        # the handler knows its outcome was committed, either way, and says so once
        executed = _lines(caplog, f"request_id={rid}, duration=")
        assert len(executed) == 1, executed
        if lost == "reply":
            assert _lines(caplog, "committed before its reply was lost")
        assert not _lines(caplog, "left pending")


# --------------------------------------------------------------------------- Redis restarts


async def test_redis_restarts_lose_nothing_and_end_every_task_at_once(
    settings: Settings,
    own_redis: Restartable,
    tester_package: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert own_redis.server is not None
    url = own_redis.server.url
    caplog.set_level(logging.WARNING)
    async with running_daemon(_fast(settings, redis_url=url), shutdown_grace_s=5) as daemon:
        traffic = Traffic(url, daemon.keys)
        installed = await traffic.client.wait(
            await traffic.client.install(tester_package), timeout=300
        )
        assert isinstance(installed, Installed), installed
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.ports['api']}")
        gateway = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{daemon.ports['gateway']}",
            headers={"X-Api-Key": "test-key"},
        )
        async with http, gateway, anyio.create_task_group() as tg:
            await tg.start(traffic.run)
            await anyio.sleep(1.5)
            sleepers: list[str] = []
            in_flight: dict[str, tuple[float, float]] = {}  # outage -> (down at, back at)
            for how in ("clean", "kill -9"):
                for _ in range(3):  # tasks whose plugin finishes while Redis is away
                    rid = await traffic.send("sleep", seconds=0.8)
                    assert rid is not None
                    sleepers.append(rid)
                await anyio.sleep(0.3)
                down_at = time.time()
                await (own_redis.stop() if how == "clean" else own_redis.kill())
                await anyio.sleep(0.5)
                status, body = await _health(http)
                assert status == 503 and body["components"]["redis"]["status"] == "down", body
                refused = await gateway.post(
                    "/api/v1/tasks",
                    json={
                        "plugin_id": "acme/tester",
                        "access": "tool",
                        "action": "invoke_tool",
                        "payload": {"provider": "tester", "tool": "echo"},
                    },
                )
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "redis_unavailable"
                await anyio.sleep(1.5)
                await own_redis.start()
                back_at = time.time()
                in_flight[how] = (down_at, back_at)
                assert await _until_health(http, 200, timeout=5) < 0.5
                # a fresh task runs at once
                fresh = await traffic.send("echo", fresh=how)
                assert fresh is not None
                done = await traffic.client.wait(fresh, timeout=3)
                assert isinstance(done, TaskSucceeded), done
                await anyio.sleep(1.5)
            tg.cancel_scope.cancel()

        ended = await traffic.all_ended(timeout=15)  # no acknowledged command was lost
        twice = {rid: at for rid, at in ended.items() if len(at) > 1}
        assert not twice, f"requests with two terminal events: {twice}"
        for how, (down_at, back_at) in in_flight.items():
            # every request that had not ended when Redis went away ended soon after its return
            late = {
                rid: round(at[0] / 1000 - back_at, 2)
                for rid, at in ended.items()
                if rid in traffic.acknowledged
                and traffic.acknowledged[rid] < down_at
                and at[0] / 1000 > down_at
                and at[0] / 1000 > back_at + 3
            }
            assert not late, f"{how}: ended later than 3 s after Redis's return: {late}"
        assert all(rid in ended for rid in sleepers)
        assert traffic.refused > 0  # the producer did meet the outages
        await traffic.redis.aclose()

        assert len(_lines(caplog, "Redis unreachable")) == 2, _lines(caplog, "Redis unreach")
        assert len(_lines(caplog, "Redis reachable again")) == 2
        assert not _lines(caplog, "left pending")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.ports['api']}") as h:
            metrics = (await h.get("/metrics")).text
        node = daemon.settings.node  # every series of a node is labelled with it
        assert (
            f'plugind_dependency_outages_total{{dependency="redis",node="{node}"}} 2.0' in metrics
        )


# --------------------------------------------------------------------------- Postgres outage


@pytest.fixture
async def postgres_database(own_postgres: Restartable) -> str:
    assert own_postgres.server is not None
    return own_postgres.server.url


async def test_tasks_keep_running_while_postgres_is_down(
    settings: Settings,
    own_postgres: Restartable,
    postgres_database: str,
    tester_package: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    assert settings.redis_url is not None
    config = _fast(settings, database_url=postgres_database)
    async with running_daemon(config, shutdown_grace_s=5) as daemon:  # every role, projector too
        traffic = Traffic(settings.redis_url, daemon.keys)
        client = traffic.client
        installed = await client.wait(await client.install(tester_package), timeout=300)
        assert isinstance(installed, Installed), installed
        http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{daemon.ports['api']}",
            headers={"X-Api-Key": config.api_key or ""},
        )
        async with http, anyio.create_task_group() as tg:
            await tg.start(traffic.run)
            await anyio.sleep(1)
            await own_postgres.stop()
            down_at = time.time()
            await anyio.sleep(0.5)
            status, body = await _health(http)
            assert status == 503, body
            assert body["components"]["postgres"]["status"] == "down", body
            assert body["components"]["redis"]["status"] == "up", body
            read = await http.get("/api/v1/tasks/echo-1")
            assert read.status_code == 503 and read.json()["error"]["code"] == (
                "database_unavailable"
            )
            # installs need Postgres (the package store): they fail at once, and clearly
            again = await client.wait(await client.install(tester_package), timeout=30)
            assert isinstance(again, InstallFailed), again
            assert again.error.code == "database_unavailable", again.error
            # tasks of installed plugins do not: they keep ending on the stream
            during = await traffic.send("echo", during="outage")
            assert during is not None
            done = await client.wait(during, timeout=5)
            assert isinstance(done, TaskSucceeded), done
            await anyio.sleep(max(0.0, down_at + 5 - time.time()))
            await own_postgres.start()
            assert await _until_health(http, 200, timeout=10) < 5
            await anyio.sleep(1)
            tg.cancel_scope.cancel()

        ended = await traffic.all_ended(timeout=15)
        assert not {rid: at for rid, at in ended.items() if len(at) > 1}
        outage_ends = [at[0] / 1000 for at in ended.values() if down_at < at[0] / 1000]
        assert len(outage_ends) > 100  # ~50/s kept ending all along
        await traffic.redis.aclose()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.ports['api']}") as h:
            metrics = (await h.get("/metrics")).text
        node = daemon.settings.node
        assert (
            f'plugind_dependency_outages_total{{dependency="postgres",node="{node}"}} 1.0'
            in metrics
        )

    assert len(_lines(caplog, "Postgres unreachable")) == 1, _lines(caplog, "Postgres unreach")
    assert len(_lines(caplog, "Postgres reachable again")) == 1
    assert not _lines(caplog, "Failed to restore the pool connection floor")
    assert not _lines(caplog, "left pending")


async def test_the_event_log_catches_up_after_a_postgres_outage(
    settings: Settings,
    own_postgres: Restartable,
    postgres_database: str,
    tester_package: bytes,
) -> None:
    assert settings.redis_url is not None
    config = _fast(settings, database_url=postgres_database)
    async with running_daemon(config, shutdown_grace_s=5) as daemon:
        traffic = Traffic(settings.redis_url, daemon.keys)
        installed = await traffic.client.wait(
            await traffic.client.install(tester_package), timeout=300
        )
        assert isinstance(installed, Installed), installed
        async with anyio.create_task_group() as tg:
            await tg.start(traffic.run)
            await anyio.sleep(0.5)
            await own_postgres.stop()
            await anyio.sleep(4)
            await own_postgres.start()
            await anyio.sleep(0.5)
            tg.cancel_scope.cancel()
        ended = await traffic.all_ended(timeout=15)
        await traffic.redis.aclose()
        # the install's own terminal event is not a task's
        expected = sum(len(at) for rid, at in ended.items() if rid in traffic.acknowledged)
        await eventually(
            postgres_database,
            "SELECT count(*) FROM event_log WHERE type LIKE 'task.%' AND type <> 'task.started'",
            timeout=15,
            expect=expected,
        )
