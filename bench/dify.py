"""Benchmark: the cost of the Dify path (HTTP dispatch + SSE relay) over a plain XADD.

Starts ``plugind serve`` with the worker, projector and api roles as processes of their own (on
the Redis and Postgres given by ``REDIS_URL`` / ``DATABASE_URL``, else the local ones), installs
the example calc and parrot plugins for one tenant, then measures

1. tool invoke latency at one fixed ``--rate`` for ``--seconds``, each way in turn:
   - stream: XADD a task command, latency = until its terminal event is on the events stream;
   - dify: ``POST /plugin/{tenant}/dispatch/tool/invoke`` as dify-api sends it, latency = until
     the last byte of the SSE answer (the plugin's two messages);
2. time to the first streamed LLM chunk (parrot, no delay, 16 words), ``--llm`` calls one after
   another: through ``/dispatch/llm/invoke`` (first ``data:`` frame on the socket) and through
   the stream (XADD with ``"stream": true``, first entry of ``{ns}:out:<id>``).

Each run uses a fresh namespace and database, dropped afterwards.

    python bench/dify.py --rate 50 --seconds 10 --llm 50

The default rate is half of bench/tasks.py's: the Dify path costs more CPU per call (HTTP in
the api process and in the client, two more Redis writes per chunk), and on a 2-core machine shared
with other work 100/s through HTTP is past what it can serve, so latency measures the queue.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import redis.asyncio as aioredis

from plugind.bus.codec import EVENT_FIELD, text
from plugind.bus.keys import Keys
from plugind.client import Client, new_request_id
from plugind.messages import TERMINAL_EVENT_TYPES, TaskCommand, decode_event
from plugind.package.difypkg import build_package

REPO = Path(__file__).resolve().parent.parent
TERMINAL_TASK = {t for t in TERMINAL_EVENT_TYPES if t.startswith("task.")}
TENANT = "bench-tenant"
KEY = "bench-key"
ADD = {"provider": "calc", "tool": "add", "tool_parameters": {"a": 1, "b": 2}, "credentials": {}}
WORDS = " ".join(f"w{i}" for i in range(16))
LLM = {
    "provider": "parrot",
    "model_type": "llm",
    "model": "parrot-chat",
    "credentials": {},
    "prompt_messages": [{"role": "user", "content": WORDS}],
    "model_parameters": {"delay_ms": 0},
    "tools": None,
    "stop": None,
    "stream": True,
}


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


def summary(name: str, values_ms: list[float]) -> str:
    return (
        f"{name}: n={len(values_ms)} p50 {percentile(values_ms, 0.5):.1f} ms,"
        f" p99 {percentile(values_ms, 0.99):.1f} ms, mean {statistics.fmean(values_ms):.1f} ms,"
        f" max {max(values_ms):.1f} ms"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def dispatch_body(data: dict[str, Any]) -> bytes:
    return json.dumps({"user_id": "bench", "data": data}).encode()


def headers(plugin_id: str) -> dict[str, str]:
    return {"X-Api-Key": KEY, "X-Plugin-ID": plugin_id, "Content-Type": "application/json"}


async def dispatch(http: httpx.AsyncClient, route: str, plugin_id: str, body: bytes) -> float:
    """One dispatch read to its end; returns the seconds to the first frame."""
    started = time.perf_counter()
    first = 0.0
    async with http.stream(
        "POST", f"/plugin/{TENANT}/dispatch/{route}", content=body, headers=headers(plugin_id)
    ) as response:
        async for chunk in response.aiter_bytes():
            if not first:
                first = time.perf_counter() - started
            if b'"code":0' not in chunk:
                raise RuntimeError(f"{route}: {chunk[:300]!r}")
    return first


async def paced(rate: float, seconds: float, one: Any) -> list[float]:
    """Start ``one()`` at a fixed rate (whatever the previous calls are doing); its latencies.

    ``one(started)`` returns when its call ended (``time.perf_counter()``)."""
    latencies: list[float] = []

    async def timed() -> None:
        started = time.perf_counter()
        ended = await one(started)
        latencies.append((ended - started) * 1000)

    interval = 1.0 / rate
    async with anyio.create_task_group() as tg:
        begin = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = begin + i * interval - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            tg.start_soon(timed)
    return latencies


async def main(args: argparse.Namespace) -> None:
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    dbname = namespace.replace("-", "_")
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    database_url = admin_url.rsplit("/", 1)[0] + "/" + dbname
    port = free_port()
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        PLUGIND_NAMESPACE=namespace,
        PLUGIND_API_KEY=KEY,
        PLUGIN_WORKER_COUNT=str(args.workers),
        PLUGIN_DIR=str(REPO / ".plugind" / "bench-plugins"),
        PLUGIND_HTTP_PORT=str(port),
        PLUGIND_HTTP_HOST="127.0.0.1",
        LOG_LEVEL="WARN",
    )
    daemons = [
        subprocess.Popen(  # noqa: ASYNC220 - started once, before any async work
            [sys.executable, "-m", "plugind.cli", "serve", "--role", role], env=env
        )
        for role in ("worker", "projector", "api")
    ]
    redis = aioredis.Redis.from_url(redis_url)
    keys = Keys(namespace)
    client = Client(redis, keys)
    limits = httpx.Limits(max_keepalive_connections=50, max_connections=100)  # as dify-api's
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60, trust_env=False
    )
    try:
        for example in ("calc", "parrot"):
            package = build_package(REPO / "examples" / "plugins" / example)
            event = await client.wait(await client.install(package, tenant_id=TENANT), 600)
            print(f"installed: {getattr(event, 'identifier', event)}")
        with anyio.fail_after(60):
            while True:
                try:
                    if (await http.get("/health/check")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.2)
        tracker = Tracker(redis, keys)
        async with anyio.create_task_group() as tg:
            tg.start_soon(tracker.run)
            await anyio.sleep(0.2)
            body = dispatch_body(ADD)
            for _ in range(50):  # warm-up: processes, connections
                await dispatch(http, "tool/invoke", "acme/calc", body)

            async def by_stream(started: float) -> float:
                rid = await client.send(_add_task())
                await tracker.wait_for([rid], 60)
                return tracker.done[rid]  # when the tracker read the event, not when polled

            async def by_dify(started: float) -> float:
                await dispatch(http, "tool/invoke", "acme/calc", body)
                return time.perf_counter()

            print(f"tool invoke (calc/add) at {args.rate:g}/s for {args.seconds:g}s each:")
            stream_ms = await paced(args.rate, args.seconds, by_stream)
            print("  " + summary("stream (XADD -> terminal event)", stream_ms))
            dify_ms = await paced(args.rate, args.seconds, by_dify)
            print("  " + summary("dify (POST /dispatch/tool/invoke -> end of SSE)", dify_ms))
            overhead = percentile(dify_ms, 0.5) - percentile(stream_ms, 0.5)
            print(f"  overhead of the Dify path at p50: {overhead:+.1f} ms")

            llm_body = dispatch_body(LLM)
            first_http: list[float] = []
            for _ in range(args.llm):
                first_http.append(
                    await dispatch(http, "llm/invoke", "acme/parrot", llm_body) * 1000
                )
            first_stream = [await _first_chunk(client, redis, keys) * 1000 for _ in range(args.llm)]
            print(f"time to the first streamed LLM chunk (parrot, {args.llm} calls in a row):")
            print("  " + summary("dify (POST /dispatch/llm/invoke -> first frame)", first_http))
            print("  " + summary("stream (XADD stream:true -> first out entry)", first_stream))
            print(f"failed tasks: {tracker.failed}")
            tg.cancel_scope.cancel()
    finally:
        await http.aclose()
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            daemon.wait(30)
        async for key in redis.scan_iter(match="{" + namespace + "}*"):
            await redis.delete(key)
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


async def _first_chunk(client: Client, redis: aioredis.Redis, keys: Keys) -> float:
    command = TaskCommand(
        request_id=new_request_id(),
        tenant_id=TENANT,
        plugin_id="acme/parrot",
        access="model",
        action="invoke_llm",
        user_id="bench",
        payload=LLM,
        stream=True,
    )
    started = time.perf_counter()
    await client.send(command)
    out = keys.out(command.request_id)
    reply: Any = await redis.xread({out: "0-0"}, count=1, block=60_000)
    first = time.perf_counter() - started
    if not reply:
        raise RuntimeError("no chunk within 60 s")
    cursor = text(reply[0][1][0][0])
    while True:  # read it to its end, as a client would
        reply = await redis.xread({out: cursor}, count=100, block=60_000)
        entries = reply[0][1] if reply else []
        if not entries:
            raise RuntimeError("the stream did not end within 60 s")
        cursor = text(entries[-1][0])
        if any(b"end" in fields for _id, fields in entries):
            return first


def _add_task() -> TaskCommand:
    return TaskCommand(
        request_id=new_request_id(),
        tenant_id=TENANT,
        plugin_id="acme/calc",
        access="tool",
        action="invoke_tool",
        user_id="bench",
        payload=ADD,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--llm", type=int, default=50, help="LLM calls for time-to-first-chunk")
    parser.add_argument("--workers", type=int, default=64, help="PLUGIN_WORKER_COUNT")
    anyio.run(main, parser.parse_args())
