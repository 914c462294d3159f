"""Recovery through the whole daemon: killed plugins, crashed consumers, dead letters."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from typing import Any

import anyio
import pytest
from e2e import eventually, run_cli
from plugin_factory import package_bytes, write_plugin

from plugind.bus.keys import WORKERS_GROUP
from plugind.client import Client
from plugind.config import Settings
from plugind.daemon import Daemon, running_daemon
from plugind.messages import (
    CommandDeadLettered,
    Installed,
    TaskCommand,
    TaskFailed,
    TaskStarted,
    TaskSucceeded,
    encode,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tester_package(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return package_bytes(write_plugin(tmp_path_factory.mktemp("tester"), name="tester"))


async def _started_pid(daemon: Daemon) -> int:
    assert daemon.plugins is not None
    with anyio.fail_after(20):
        while True:
            for plugin in daemon.plugins.snapshot().plugins:
                for process in plugin.processes:
                    if process.in_flight and process.pid:
                        return process.pid
            await anyio.sleep(0.02)


async def test_a_plugin_killed_mid_task_fails_it_and_comes_back(
    daemon: Daemon, client: Client, tester_package: bytes
) -> None:
    installed = await client.wait(await client.install(tester_package), timeout=300)
    assert isinstance(installed, Installed), installed
    rid = await client.invoke_tool("acme/tester", "tester", "sleep", {"seconds": 30})
    os.kill(await _started_pid(daemon), signal.SIGKILL)
    with anyio.fail_after(10):
        killed = await client.wait(rid, timeout=10)
    assert isinstance(killed, TaskFailed), killed
    assert killed.error.code == "plugin_crashed"

    rid = await client.invoke_tool("acme/tester", "tester", "echo", {"n": 1})
    again = await client.wait(rid, timeout=60)
    assert isinstance(again, TaskSucceeded), again


def _task(rid: str) -> dict[str, Any]:
    command = TaskCommand(
        request_id=rid,
        timeout_s=30,
        plugin_id="acme/tester",
        access="tool",
        action="invoke_tool",
        payload={
            "provider": "tester",
            "tool": "echo",
            "tool_parameters": {"n": 2},
            "credentials": {},
        },
    )
    return {"cmd": encode(command)}


async def test_work_of_a_crashed_consumer_is_retried_then_dead_lettered(
    settings: Settings, redis: Any, tester_package: bytes
) -> None:
    async with running_daemon(settings, shutdown_grace_s=5) as first:
        keys = first.keys
        client = Client(redis, keys)
        assert isinstance(await client.wait(await client.install(tester_package), 300), Installed)

    # While no daemon runs, a consumer takes two commands and dies. One was read once: it is
    # retried and succeeds. The other had been delivered twice (the limit): it is dead-lettered.
    await redis.xadd(keys.tasks, _task("orphan"))
    await redis.xadd(keys.tasks, _task("poison"))
    [[_stream, [(_orphan_id, _), (poison_id, _)]]] = await redis.xreadgroup(
        WORKERS_GROUP, "dead-node", {keys.tasks: ">"}, count=2
    )
    await redis.xclaim(keys.tasks, WORKERS_GROUP, "dead-node", 0, [poison_id])

    fast = replace(settings, task_timeout=0.5, takeover_after=2.0, max_deliveries=2)
    async with running_daemon(fast, shutdown_grace_s=5):
        retried = await client.wait("orphan", timeout=30)
        assert isinstance(retried, TaskSucceeded), retried
        started = [e for e in await client.events_of("orphan") if isinstance(e, TaskStarted)]
        assert [e.attempt for e in started] == [2]

        dead = await client.wait("poison", timeout=30)
        assert isinstance(dead, CommandDeadLettered), dead
        assert dead.deliveries == 2 and dead.error.code == "max_deliveries_exceeded"
        [(_id, fields)] = await redis.xrange(keys.dead)
        assert fields[b"stream"].decode() == keys.tasks
        assert b"poison" in fields[b"fields"]
        assert (await redis.xpending(keys.tasks, WORKERS_GROUP))["pending"] == 0

        # the operator looks at it and publishes it again, under a new request id
        _, out, _ = await run_cli(fast, "dlq", "list")
        assert "request_id=poison" in out and "max_deliveries_exceeded" in out
        _, out, _ = await run_cli(fast, "dlq", "retry", "--all")
        new_rid = out.split("request_id=")[1].strip()
        assert new_rid.startswith("poison:retry:")
        retried_dead = await client.wait(new_rid, timeout=30)
        assert isinstance(retried_dead, TaskSucceeded), retried_dead
        assert await redis.xlen(keys.dead) == 0


async def test_a_lost_registry_is_restored_from_postgres(
    settings: Settings, redis: Any, tester_package: bytes
) -> None:
    async with running_daemon(settings, shutdown_grace_s=5) as first:
        keys = first.keys
        client = Client(redis, keys)
        installed = await client.wait(await client.install(tester_package, tenant_id="t7"), 300)
        assert isinstance(installed, Installed), installed
        assert settings.database_url is not None
        await eventually(
            settings.database_url,
            "SELECT status FROM plugins WHERE tenant_id = 't7'",
            expect="installed",
        )
    await redis.delete(keys.installed)  # e.g. Redis restarted without persistence

    async with running_daemon(settings, shutdown_grace_s=5):
        rid = await client.invoke_tool(
            "acme/tester", "tester", "echo", {"n": 3}, tenant_id="t7", user_id="u"
        )
        done = await client.wait(rid, timeout=60)
        assert isinstance(done, TaskSucceeded), done
