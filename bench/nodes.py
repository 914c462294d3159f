"""Benchmark: throughput with 1, 2, 3 worker nodes, where the CPU goes, memory per node.

Starts ``--nodes`` processes ``plugind serve --role worker`` (each with its own ``PLUGIN_DIR``
and name) and one ``--role projector,api`` process, on the Redis and Postgres given by
``REDIS_URL`` / ``DATABASE_URL`` (else the local ones), installs the example calc plugin, warms
every node up, then publishes ``--tasks`` add tasks at once and reports tasks/s from the first
publish to the last terminal event, the CPU seconds each process spent meanwhile (each worker
with its plugin processes, the projector, Redis, Postgres, this benchmark), and each worker's
resident memory (daemon and plugin processes). Redis and Postgres may be shared with other
work, which their CPU figures then include.

    python bench/nodes.py --nodes 1 2 3 --tasks 4000 --workers 32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import psutil  # type: ignore[import-untyped]
import redis.asyncio as aioredis

from plugind.bus.codec import EVENT_FIELD, text
from plugind.bus.keys import Keys
from plugind.bus.nodes import read_reports
from plugind.client import Client, new_request_id
from plugind.messages import TaskCommand
from plugind.package.difypkg import build_package

REPO = Path(__file__).resolve().parent.parent


class Tracker:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self.done: dict[str, float] = {}
        self.by_node: dict[str, int] = {}

    async def run(self) -> None:
        cursor = "$"
        while True:
            reply: Any = await self.redis.xread({self.keys.events: cursor}, count=2000, block=1000)
            now = time.perf_counter()
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    cursor = text(entry_id)
                    raw: bytes = fields[EVENT_FIELD.encode()]
                    if b'"task.succeeded"' in raw[:40] or b'"task.failed"' in raw[:40]:
                        rid = raw.split(b'"request_id":"', 1)[1].split(b'"', 1)[0].decode()
                        node = raw.split(b'"node":"', 1)[1].split(b'"', 1)[0].decode()
                        self.done[rid] = now
                        self.by_node[node] = self.by_node.get(node, 0) + 1

    async def wait_for(self, ids: list[str], timeout: float) -> None:
        with anyio.fail_after(timeout):
            while not all(i in self.done for i in ids):
                await anyio.sleep(0.01)


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (plugin processes)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _own_cpu() -> float:
    """This benchmark's own CPU (publishing, following the events), not its children's."""
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def _tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


def _named_cpu(name: str) -> float:
    total = 0.0
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if proc.info["name"] and proc.info["name"].startswith(name) and proc.info["cpu_times"]:
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


async def run(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    dbname = namespace.replace("-", "_")
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    database_url = admin_url.rsplit("/", 1)[0] + "/" + dbname
    base = dict(
        os.environ,
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        PLUGIND_NAMESPACE=namespace,
        PLUGIN_WORKER_COUNT=str(args.workers),
        PLUGIND_HTTP_PORT="0",
        LOG_LEVEL="WARN",
    )
    plugin_root = REPO / ".plugind" / "bench-nodes"
    processes: dict[str, subprocess.Popen[bytes]] = {}
    processes["projector"] = subprocess.Popen(  # noqa: ASYNC220 - started once, before the work
        [sys.executable, "-m", "plugind.cli", "serve", "--role", "projector,api"],
        env={**base, "PLUGIND_NODE": "projector", "PLUGIN_DIR": str(plugin_root / "projector")},
    )
    for i in range(nodes):
        name = f"worker-{i}"
        processes[name] = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "plugind.cli", "serve", "--role", "worker"],
            env={**base, "PLUGIND_NODE": name, "PLUGIN_DIR": str(plugin_root / name)},
        )
    redis = aioredis.Redis.from_url(redis_url)
    keys = Keys(namespace)
    client = Client(redis, keys)
    result: dict[str, Any] = {"nodes": nodes}
    try:
        installed = await client.wait(
            await client.install(build_package(REPO / "examples/plugins/calc")), 600
        )
        assert getattr(installed, "identifier", None), installed
        tracker = Tracker(redis, keys)
        async with anyio.create_task_group() as tg:
            tg.start_soon(tracker.run)
            await anyio.sleep(0.2)
            # warm-up until every worker node has run tasks (built the plugin, started it)
            with anyio.fail_after(300):
                while len([n for n in tracker.by_node if n.startswith("worker-")]) < nodes:
                    warm = await client.send_many([_add() for _ in range(args.workers * nodes)])
                    await tracker.wait_for(warm, 120)
            tracker.by_node.clear()
            cpu_before = {name: _tree_cpu(p.pid) for name, p in processes.items()}
            redis_before, pg_before = _named_cpu("redis-server"), _named_cpu("postgres")
            self_before = _own_cpu()
            start = time.perf_counter()
            sent: list[str] = []
            for offset in range(0, args.tasks, 500):
                sent += await client.send_many(
                    [_add() for _ in range(min(500, args.tasks - offset))]
                )
            await tracker.wait_for(sent, 600)
            elapsed = max(tracker.done[rid] for rid in sent) - start
            result["tasks_per_s"] = args.tasks / elapsed
            result["cpu_s"] = {
                name: _tree_cpu(p.pid) - cpu_before[name] for name, p in processes.items()
            }
            result["cpu_s"]["redis-server"] = _named_cpu("redis-server") - redis_before
            result["cpu_s"]["postgres"] = _named_cpu("postgres") - pg_before
            result["cpu_s"]["bench"] = _own_cpu() - self_before
            result["elapsed_s"] = elapsed
            result["by_node"] = dict(sorted(tracker.by_node.items()))
            result["rss_mib"] = {
                name: _tree_rss(p.pid) / 2**20
                for name, p in processes.items()
                if name.startswith("worker-")
            }
            result["reports"] = len(await read_reports(redis, keys))
            tg.cancel_scope.cancel()
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(60)
        async for key in redis.scan_iter(match="{" + namespace + "}*"):
            await redis.delete(key)
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()
    return result


def _add() -> TaskCommand:
    return TaskCommand(
        request_id=new_request_id(),
        plugin_id="acme/calc",
        access="tool",
        action="invoke_tool",
        user_id="bench",
        payload={
            "provider": "calc",
            "tool": "add",
            "tool_parameters": {"a": 1, "b": 2},
            "credentials": {},
        },
    )


async def main(args: argparse.Namespace) -> None:
    for nodes in args.nodes:
        result = await run(nodes, args)
        cpu = result["cpu_s"]
        total = sum(cpu.values())
        split = ", ".join(
            f"{name} {seconds:.1f}s ({seconds / total:.0%})" for name, seconds in cpu.items()
        )
        memory = ", ".join(f"{name} {mib:.0f} MiB" for name, mib in result["rss_mib"].items())
        print(
            f"{nodes} node(s): {result['tasks_per_s']:.0f} tasks/s "
            f"({args.tasks} in {result['elapsed_s']:.1f}s); by node {result['by_node']}\n"
            f"  CPU over the run: {split}; {total / result['elapsed_s']:.2f} cores busy\n"
            f"  memory (daemon + plugin processes): {memory}",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=32, help="PLUGIN_WORKER_COUNT per node")
    anyio.run(main, parser.parse_args())
