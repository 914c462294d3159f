"""Benchmark: real-plugin tool tasks through the whole daemon.

Starts ``plugind serve --role worker`` and ``--role projector`` as processes of their own
(on the Redis and Postgres given by ``REDIS_URL`` / ``DATABASE_URL``, else the local ones),
installs the example calc plugin, then

1. throughput: publishes ``--tasks`` add tasks at once and reports tasks/s from the first
   publish to the last terminal event;
2. latency: publishes at a fixed ``--rate`` (default 100 tasks/s) for ``--seconds`` and reports
   p50/p99 from publish to terminal event.

Each run uses a fresh namespace and database, dropped afterwards.

    python bench/tasks.py --tasks 6000 --rate 100 --seconds 10 --workers 64 --instances 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import redis.asyncio as aioredis

from plugind.bus.codec import EVENT_FIELD, text
from plugind.bus.keys import Keys
from plugind.client import Client, new_request_id
from plugind.messages import TERMINAL_EVENT_TYPES, TaskCommand, decode_event
from plugind.package.difypkg import build_package

REPO = Path(__file__).resolve().parent.parent
TERMINAL_TASK = {t for t in TERMINAL_EVENT_TYPES if t.startswith("task.")}


class Tracker:
    """Reads the events stream and notes when each request's terminal event arrived."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self.done: dict[str, float] = {}
        self.failed = 0

    async def run(self) -> None:
        cursor = "$"
        while True:
            reply: Any = await self.redis.xread({self.keys.events: cursor}, count=1000, block=1000)
            now = time.perf_counter()
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    cursor = text(entry_id)
                    raw = fields[EVENT_FIELD.encode()]
                    if b'"type":"task.' not in raw[:40]:
                        continue
                    event = decode_event(raw)
                    tag = event.__struct_config__.tag
                    if tag in TERMINAL_TASK:
                        self.done[event.request_id] = now
                        if tag != "task.succeeded":
                            self.failed += 1

    async def wait_for(self, ids: list[str], timeout: float) -> None:
        with anyio.fail_after(timeout):
            while not all(i in self.done for i in ids):
                await anyio.sleep(0.01)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> None:
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    dbname = namespace.replace("-", "_")
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    database_url = admin_url.rsplit("/", 1)[0] + "/" + dbname
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        PLUGIND_NAMESPACE=namespace,
        PLUGIN_WORKER_COUNT=str(args.workers),
        PLUGIN_INSTANCES=str(args.instances),
        PLUGIN_DIR=str(REPO / ".plugind" / "bench-plugins"),
        PLUGIND_HTTP_PORT="0",
        LOG_LEVEL="WARN",
    )
    # The worker and the projector in processes of their own, as a deployment would split them.
    daemons = [
        subprocess.Popen(  # noqa: ASYNC220 - started once, before any async work
            [sys.executable, "-m", "plugind.cli", "serve", "--role", role], env=env
        )
        for role in args.roles.split("+")
    ]
    redis = aioredis.Redis.from_url(redis_url)
    keys = Keys(namespace)
    client = Client(redis, keys)
    try:
        installed = await client.wait(
            await client.install(build_package(REPO / "examples/plugins/calc")), 600
        )
        print(f"installed: {getattr(installed, 'identifier', installed)}")
        tracker = Tracker(redis, keys)
        async with anyio.create_task_group() as tg:
            tg.start_soon(tracker.run)
            await anyio.sleep(0.2)
            # warm-up: start every process
            warm = [await _publish(client) for _ in range(args.workers * 2)]
            await tracker.wait_for([rid for rid, _ in warm], 120)

            # 1. throughput: published in pipelined batches, as a busy producer would
            start = time.perf_counter()
            sent: list[tuple[str, float]] = []
            for offset in range(0, args.tasks, 200):
                batch = [_add_task() for _ in range(min(200, args.tasks - offset))]
                now = time.perf_counter()
                sent += [(rid, now) for rid in await client.send_many(batch)]
            await tracker.wait_for([rid for rid, _ in sent], 600)
            elapsed = max(tracker.done[rid] for rid, _ in sent) - start
            print(
                f"throughput: {args.tasks} tasks in {elapsed:.2f}s = "
                f"{args.tasks / elapsed:.0f} tasks/s (failed: {tracker.failed})"
            )

            # 2. latency at a fixed rate
            paced: list[tuple[str, float]] = []
            interval = 1.0 / args.rate
            begin = time.perf_counter()
            for i in range(int(args.rate * args.seconds)):
                target = begin + i * interval
                delay = target - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                paced.append(await _publish(client))
            await tracker.wait_for([rid for rid, _ in paced], 120)
            lat = [(tracker.done[rid] - sent_at) * 1000 for rid, sent_at in paced]
            print(
                f"latency at {args.rate}/s over {len(lat)} tasks:"
                f" p50 {percentile(lat, 0.5):.1f} ms,"
                f" p99 {percentile(lat, 0.99):.1f} ms, mean {statistics.fmean(lat):.1f} ms,"
                f" max {max(lat):.1f} ms"
            )
            tg.cancel_scope.cancel()
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            daemon.wait(30)
        async for key in redis.scan_iter(match="{" + namespace + "}*"):
            await redis.delete(key)
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


def _add_task() -> TaskCommand:
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


async def _publish(client: Client) -> tuple[str, float]:
    sent_at = time.perf_counter()
    rid = await client.invoke_tool("acme/calc", "calc", "add", {"a": 1, "b": 2}, user_id="bench")
    return rid, sent_at


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=6000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=64, help="PLUGIN_WORKER_COUNT")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument(
        "--roles",
        default="worker+projector",
        help="daemon processes to start, '+'-separated roles of each (default: worker+projector)",
    )
    anyio.run(main, parser.parse_args())
