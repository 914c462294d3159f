"""Many nodes, one system: each node with its own ``PLUGIN_DIR``, one Redis namespace, one database.

- a node killed with SIGKILL while it runs tasks (``PLUGIN_TASK_TIMEOUT=600``): another node
  takes its work over once the node has been silent for ``PLUGIND_TAKEOVER_AFTER`` (30 s), and
  every request ends exactly once;
- a slow task on a live node is never taken over, however short the takeover period;
- tasks spread over the nodes; an upgrade and an uninstall reach every node's processes and
  folders (in-flight requests of the old version finish on it); the projector fails over.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from e2e import eventually
from plugin_factory import ECHO, SLEEP, is_running, package_bytes, write_plugin

from plugind.bus.keys import WORKERS_GROUP, Keys
from plugind.bus.nodes import read_reports
from plugind.client import Client
from plugind.config import Settings
from plugind.daemon import Daemon, running_daemon
from plugind.messages import Installed, TaskStarted, TaskSucceeded, Uninstalled, is_terminal
from plugind.package.difypkg import install_dir

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tester_package(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return package_bytes(write_plugin(tmp_path_factory.mktemp("tester"), name="tester"))


def _node(settings: Settings, tmp_path: Path, name: str, **changes: Any) -> Settings:
    """``settings`` for node ``name``: its own PLUGIN_DIR, its own consumer name."""
    return replace(settings, node=name, plugin_dir=tmp_path / name, **changes)


async def _terminals(redis: aioredis.Redis, keys: Keys) -> Counter[str]:
    """Terminal events per request id, over the whole events stream."""
    client = Client(redis, keys)
    return Counter([e.request_id async for _id, e in client.iter_events() if is_terminal(e)])


async def _started(redis: aioredis.Redis, keys: Keys) -> list[TaskStarted]:
    client = Client(redis, keys)
    return [e async for _id, e in client.iter_events() if isinstance(e, TaskStarted)]


@pytest.fixture
async def serve_worker(settings: Settings, tmp_path: Path) -> AsyncIterator[Any]:
    """Start ``plugind serve --role worker`` subprocesses; kill what is left at the end."""
    started: list[tuple[anyio.abc.Process, Any]] = []

    async def start(name: str, **env: str) -> anyio.abc.Process:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("PLUGIN", "PLUGIND"))}
        if "PLUGIN_PYTHON" in os.environ:
            environ["PLUGIN_PYTHON"] = os.environ["PLUGIN_PYTHON"]
        environ.update(
            REDIS_URL=settings.redis_url or "",
            DATABASE_URL=settings.database_url or "",
            PLUGIND_NAMESPACE=settings.namespace,
            PLUGIND_NODE=name,
            PLUGIN_DIR=str(tmp_path / name),
            LOG_LEVEL="INFO",
            **env,
        )
        log = (tmp_path / f"{name}.log").open("wb")
        process = await anyio.open_process(
            [sys.executable, "-m", "plugind", "serve", "--role", "worker"],
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append((process, log))
        return process

    try:
        yield start
    finally:
        for process, log in started:
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.aclose()
            log.close()


async def test_a_killed_nodes_tasks_end_exactly_once_within_the_takeover(
    settings: Settings,
    redis: aioredis.Redis,
    tester_package: bytes,
    tmp_path: Path,
    serve_worker: Any,
) -> None:
    # Dify's default task timeout (600 s), with a takeover period shorter than the default 30 s
    # to keep the suite quick: the point is that it, not the timeout, decides. Run with
    # PLUGIND_TEST_TAKEOVER=30 to see the default (all ended 30.9 s after the kill when measured).
    takeover = float(os.environ.get("PLUGIND_TEST_TAKEOVER", "12"))
    node_b = _node(
        settings, tmp_path, "node-b", task_timeout=600.0, worker_count=8, takeover_after=takeover
    )
    async with running_daemon(node_b, shutdown_grace_s=5) as b:
        keys = b.keys
        client = Client(redis, keys)
        installed = await client.wait(await client.install(tester_package), timeout=300)
        assert isinstance(installed, Installed), installed
        node_a = await serve_worker(
            "node-a",
            PLUGIN_TASK_TIMEOUT="600",
            PLUGIN_WORKER_COUNT="8",
            PLUGIND_TAKEOVER_AFTER=f"{takeover:g}",
        )
        with anyio.fail_after(60):  # node-a is up once it reports
            while not any(r.node == "node-a" for r in await read_reports(redis, keys)):
                assert node_a.returncode is None, (tmp_path / "node-a.log").read_text()
                await anyio.sleep(0.1)

        rids = await client.send_many(
            [_sleep_task(f"t{i}", 0.3 if i % 3 else 0.05) for i in range(300)]
        )
        # kill node-a once it is busy: it has finished tasks and holds some more
        with anyio.fail_after(60):
            while True:
                started = await _started(redis, keys)
                mine = await redis.xpending_range(
                    keys.tasks, WORKERS_GROUP, "-", "+", 100, consumername="node-a"
                )
                ran_on_a = {e.request_id for e in started if e.node == "node-a"}
                if len(ran_on_a) >= 10 and mine:
                    break
                await anyio.sleep(0.05)
        plugin_pids = [
            i.pid
            for r in await read_reports(redis, keys)
            if r.node == "node-a"
            for p in r.pool.plugins
            for i in p.instances
            if i.pid
        ]
        os.killpg(node_a.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        held = {str(p["message_id"]) for p in mine}

        with anyio.fail_after(takeover + 30):
            while True:
                terminals = await _terminals(redis, keys)
                if all(terminals[r] for r in rids):
                    break
                await anyio.sleep(0.2)
        ended_after = time.monotonic() - killed_at
        print(f"node-a killed holding {len(held)} entries; all ended {ended_after:.1f}s later")
        assert all(terminals[r] == 1 for r in rids), [r for r in rids if terminals[r] != 1]
        assert (await redis.xpending(keys.tasks, WORKERS_GROUP))["pending"] == 0
        # what node-a held was started again, on node-b, after about the takeover period
        second = [e for e in await _started(redis, keys) if e.attempt == 2]
        assert second and {e.node for e in second} == {"node-b"}
        assert len(second) <= len(held) + 8
        # silence since the last keep-alive (up to a sixth) plus one scan (a twelfth) at most
        assert takeover * 5 / 6 - 1 <= ended_after <= takeover * 1.1 + 6, ended_after
        for rid in rids[:20]:
            assert isinstance(await client.wait(rid, 1), TaskSucceeded)
    # a killed node's plugin processes do not outlive it for long (their stdin closed)
    with anyio.fail_after(20):
        while any(is_running(pid) for pid in plugin_pids):
            await anyio.sleep(0.2)


def _sleep_task(rid: str, seconds: float) -> Any:
    from plugind.messages import TaskCommand

    return TaskCommand(
        request_id=rid,
        plugin_id="acme/tester",
        access="tool",
        action="invoke_tool",
        payload={
            "provider": "tester",
            "tool": "sleep",
            "tool_parameters": {"seconds": seconds},
            "credentials": {},
        },
    )


async def test_a_slow_task_on_a_live_node_is_never_taken_over(
    settings: Settings, redis: aioredis.Redis, tester_package: bytes, tmp_path: Path
) -> None:
    """A task running three times the takeover period, with another node idle beside it."""
    fast = replace(settings, takeover_after=2.0, task_timeout=600.0)
    async with running_daemon(_node(fast, tmp_path, "node-a"), shutdown_grace_s=5) as a:
        client = Client(redis, a.keys)
        installed = await client.wait(await client.install(tester_package), timeout=300)
        assert isinstance(installed, Installed), installed
        rid = await client.send(_sleep_task("slow", 6.0))
        with anyio.fail_after(60):
            while not await _started(redis, a.keys):
                await anyio.sleep(0.05)
        async with running_daemon(_node(fast, tmp_path, "node-b"), shutdown_grace_s=5) as b:
            done = await client.wait(rid, timeout=30)
            assert isinstance(done, TaskSucceeded), done
            assert b.consumers and not any(c.taken_over for c in b.consumers)
    started = await _started(redis, a.keys)
    assert [(e.node, e.attempt) for e in started] == [("node-a", 1)]


# ------------------------------------------------------------------ life cycle on every node


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("spread")
    tools = {"echo": ECHO, "sleep": SLEEP}
    return {
        v: package_bytes(write_plugin(tmp / v, name="spread", version=v, tools=tools))
        for v in ("0.1.0", "0.2.0")
    }


def _running(daemon: Daemon) -> set[str]:
    """The plugin versions with a live process on ``daemon``'s node."""
    assert daemon.plugins is not None
    return {
        p.identifier for p in daemon.plugins.snapshot().plugins if any(s.alive for s in p.processes)
    }


async def _until(check: Any, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.05)


async def test_what_one_node_is_told_every_node_does(
    settings: Settings,
    redis: aioredis.Redis,
    versions: dict[str, bytes],
    tmp_path: Path,
    database_url: str,
) -> None:
    names = ("node-a", "node-b", "node-c")
    roles = {"node-a": ("worker", "projector"), "node-b": ("worker", "projector")}
    async with contextlib.AsyncExitStack() as stack:
        nodes: dict[str, Daemon] = {}
        for name in names:  # node-a first: its projector is the active one
            daemon = running_daemon(
                _node(settings, tmp_path, name), roles.get(name, ("worker",)), shutdown_grace_s=5
            )
            nodes[name] = await stack.enter_async_context(daemon)
        keys = nodes["node-a"].keys
        client = Client(redis, keys)
        v1 = await client.wait(await client.install(versions["0.1.0"]), timeout=300)
        assert isinstance(v1, Installed), v1

        # tasks spread over the nodes; each builds the plugin from the package store
        rids = await client.send_many([_task(f"e{i}", "echo", r=i) for i in range(60)])
        for rid in rids:
            assert isinstance(await client.wait(rid, 120), TaskSucceeded)
        ran_on = Counter(e.node for e in await _started(redis, keys))
        assert set(ran_on) == set(names), ran_on
        for name in names:
            assert install_dir(tmp_path / name, v1.identifier).is_dir()
            assert _running(nodes[name]) == {v1.identifier}

        # an upgrade while a request of the old version runs: that request finishes on the old
        # version, then every node runs the new one only, and the old folder is gone everywhere
        slow = await client.send(_task("slow", "sleep", seconds=3.0))
        await _until(lambda: any(_in_flight(d) for d in nodes.values()))
        v2 = await client.wait(await client.install(versions["0.2.0"]), timeout=300)
        assert isinstance(v2, Installed) and v2.upgraded_from == v1.identifier
        assert isinstance(await client.wait(slow, 30), TaskSucceeded)
        await _until(lambda: all(_running(d) == {v2.identifier} for d in nodes.values()))
        for name in names:
            old = install_dir(tmp_path / name, v1.identifier)
            await _until(lambda: not old.exists())  # noqa: B023 (awaited at once)
            assert install_dir(tmp_path / name, v2.identifier).is_dir()

        # the projector fails over to node-b when node-a stops
        nodes["node-a"].stop()
        await _until(lambda: nodes["node-a"].stopped)
        after = await client.wait(await client.send(_task("after", "echo", r=0)), 60)
        assert isinstance(after, TaskSucceeded), after
        await eventually(
            database_url, "SELECT status FROM tasks WHERE request_id = 'after'", expect="succeeded"
        )

        # an uninstall stops the processes and removes the folders of every node left
        gone = await client.wait(await client.uninstall("acme/spread"), timeout=60)
        assert isinstance(gone, Uninstalled), gone
        await _until(lambda: not any(_running(nodes[n]) for n in ("node-b", "node-c")))
        for name in ("node-b", "node-c"):
            folder = install_dir(tmp_path / name, v2.identifier)
            await _until(lambda: not folder.exists())  # noqa: B023 (awaited at once)


def _in_flight(daemon: Daemon) -> int:
    assert daemon.plugins is not None
    return daemon.plugins.snapshot().in_flight


def _task(rid: str, tool: str, **parameters: Any) -> Any:
    from plugind.messages import TaskCommand

    return TaskCommand(
        request_id=rid,
        plugin_id="acme/spread",
        access="tool",
        action="invoke_tool",
        payload={
            "provider": "spread",
            "tool": tool,
            "tool_parameters": parameters,
            "credentials": {},
        },
    )


# ------------------------------------------------------------------ folders on a shared disk


def test_a_folder_goes_only_when_no_live_node_claims_it(tmp_path: Path) -> None:
    """Nodes sharing a disk, or namespaces sharing a PLUGIN_DIR, never delete each other's."""
    from plugind.installed.local_plugins import LocalPlugins, claims_dir

    identifier = "acme/calc:0.1.0@" + "0" * 64
    folder = install_dir(tmp_path, identifier)

    def local(namespace: str, node: str) -> LocalPlugins:
        settings = Settings(plugin_dir=tmp_path, namespace=namespace, node=node)
        return LocalPlugins(settings, db=None)  # type: ignore[arg-type]

    a, b, other_ns = local("ns", "a"), local("ns", "b/1"), local("other", "a")
    dead = local("ns", "dead")
    for each in (a, b, other_ns, dead):
        each._write_claim(identifier, folder)
    folder.mkdir(parents=True, exist_ok=True)
    assert set(a.claimed()) == {identifier} and set(other_ns.claimed()) == {identifier}
    live = {a.claim, b.claim}
    assert not a._release(folder, live) and folder.is_dir()  # b (live) still claims it
    assert not b._release(folder, live) and folder.is_dir()  # another namespace does
    assert sorted(p.name for p in claims_dir(folder).iterdir()) == ["other@a"]  # dead: dropped
    assert other_ns._release(folder, {other_ns.claim})
    assert not folder.exists() and not claims_dir(folder).exists()
