"""What the benchmarks share: daemons, trackers, the no-op baseline, CPU and Postgres counters.

Every figure is also printed as one machine-readable line, ``BENCH {json}``, with its name, value,
unit and, where there is one, its ratio to the no-op baseline of the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson
import psutil
import redis.asyncio as aioredis

from plugind.bus.codec import EVENT_FIELD, text
from plugind.bus.keys import PROJECTOR_GROUP, Keys
from plugind.client import new_request_id
from plugind.messages import (
    TERMINAL_EVENT_TYPES,
    TaskCommand,
    TaskResult,
    TaskStarted,
    TaskSucceeded,
    decode_event,
    encode,
    new_event_id,
    now_rfc3339,
)

REPO = Path(__file__).resolve().parent.parent
# The checkout whose plugind the daemons run: this one, or BENCH_CODE (to compare two versions
# with the same benchmark: BENCH_CODE=/path/to/other/checkout).
CODE = Path(os.environ.get("BENCH_CODE") or REPO)
TERMINAL_TASK = {t for t in TERMINAL_EVENT_TYPES if t.startswith("task.")}
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SCHEMA = "plugind"


# ---------------------------------------------------------------------------------- reporting


class Report:
    """Prints figures for people and one ``BENCH {json}`` line each for machines."""

    def __init__(self, bench: str) -> None:
        self.bench = bench
        self.figures: list[dict[str, Any]] = []

    def figure(
        self, name: str, value: float, unit: str, *, baseline: float | None = None, **extra: Any
    ) -> None:
        row: dict[str, Any] = {"bench": self.bench, "name": name, "value": round(value, 3)}
        row["unit"] = unit
        if baseline:
            row["ratio_to_baseline"] = round(value / baseline, 3)
        row.update(extra)
        self.figures.append(row)
        print("BENCH " + orjson.dumps(row).decode(), flush=True)


def machine() -> dict[str, Any]:
    load1, load5, load15 = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "load": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def say(message: str) -> None:
    print(message, flush=True)


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x the no-op queue" if baseline else "no baseline run"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ------------------------------------------------------------------------------- environment


@dataclass
class Env:
    """One fresh namespace and database, dropped at the end."""

    namespace: str
    database_url: str
    dbname: str
    admin: asyncpg.Connection
    redis: aioredis.Redis
    keys: Keys
    daemons: list[Daemon] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        pythonpath = os.pathsep.join(p for p in (str(CODE), os.environ.get("PYTHONPATH")) if p)
        return dict(
            os.environ,
            PYTHONPATH=pythonpath,  # the daemons run this checkout's code
            REDIS_URL=REDIS_URL,
            DATABASE_URL=self.database_url,
            PLUGIND_NAMESPACE=self.namespace,
            PLUGIN_DIR=str(REPO / ".plugind" / "bench-plugins"),
            PLUGIND_HTTP_PORT="0",
            LOG_LEVEL="WARN",
            **extra,
        )

    def start(self, roles: str, **extra: str) -> Daemon:
        proc = subprocess.Popen(
            [sys.executable, "-m", "plugind.cli", "serve", "--role", roles],
            env=self.env(**extra),
            cwd=CODE,  # `python -m` puts the working directory first on sys.path
        )
        daemon = Daemon(roles, proc)
        self.daemons.append(daemon)
        return daemon

    def check_alive(self) -> None:
        """Stop the benchmark, with a clear message, if a daemon has exited."""
        for daemon in self.daemons:
            code = daemon.proc.poll()
            if code is not None:
                raise SystemExit(f"plugind serve --role {daemon.roles} exited with status {code}")

    def stop_daemons(self) -> None:
        for daemon in self.daemons:
            if daemon.proc.poll() is None:
                daemon.proc.terminate()
        for daemon in self.daemons:
            try:
                daemon.proc.wait(30)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
        self.daemons.clear()

    async def connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self.database_url, server_settings={"search_path": SCHEMA}
        )
        return conn


@contextlib.asynccontextmanager
async def fresh_env(prefix: str = "bench") -> AsyncIterator[Env]:
    namespace = f"{prefix}-{uuid.uuid4().hex[:8]}"
    dbname = namespace.replace("-", "_")
    admin: asyncpg.Connection = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    redis = aioredis.Redis.from_url(REDIS_URL)
    env = Env(
        namespace=namespace,
        database_url=ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname,
        dbname=dbname,
        admin=admin,
        redis=redis,
        keys=Keys(namespace),
    )
    try:
        yield env
    finally:
        env.stop_daemons()
        async for key in redis.scan_iter(match="{" + namespace + "}*"):
            await redis.delete(key)
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


@dataclass
class Daemon:
    roles: str
    proc: subprocess.Popen[bytes]

    def processes(self) -> list[psutil.Process]:
        """The daemon and its plugin processes."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_mb(self) -> float:
        try:
            return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20
        except psutil.NoSuchProcess:
            return 0.0


# ------------------------------------------------------------------------------ CPU counters


def _cpu(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return float(times.user + times.system)


class CpuMeter:
    """CPU seconds used by each part while a phase runs: daemons (by role), their plugin
    processes, this process (the producer), the database's Postgres backends, Redis (the whole
    server: other users of the same Redis count too)."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self._start: dict[str, float] = {}

    async def _sample(self) -> dict[str, float]:
        env = self.env
        parts: dict[str, float] = {}
        for daemon in env.daemons:
            procs = daemon.processes()
            if not procs:
                continue
            root, children = procs[0], procs[1:]
            parts[daemon.roles] = parts.get(daemon.roles, 0.0) + _cpu(root)
            if children:
                parts["plugin"] = parts.get("plugin", 0.0) + sum(_cpu(c) for c in children)
        parts["bench (producer)"] = _cpu(psutil.Process())
        pids = await env.admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            env.dbname,
        )
        parts["postgres (backends)"] = sum(_cpu(_proc(r["pid"])) for r in pids)
        info: Any = await env.redis.info("cpu")
        parts["redis (server)"] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        return parts

    async def start(self) -> None:
        self._start = await self._sample()

    async def stop(self) -> dict[str, float]:
        end = await self._sample()
        return {k: max(end[k] - self._start.get(k, 0.0), 0.0) for k in end}


def _proc(pid: int) -> psutil.Process:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return psutil.Process()  # gone meanwhile: counts as ours, close enough for a report


def cpu_table(cpu: dict[str, float], tasks: int, seconds: float) -> str:
    lines = [f"  {'part':<22} {'CPU s':>7} {'cores':>6} {'CPU µs/task':>12}"]
    for part, used in sorted(cpu.items(), key=lambda kv: -kv[1]):
        per = used / tasks * 1e6 if tasks else 0.0
        lines.append(f"  {part:<22} {used:7.2f} {used / seconds:6.2f} {per:12.0f}")
    total = sum(cpu.values())
    lines.append(
        f"  {'total':<22} {total:7.2f} {total / seconds:6.2f} "
        f"{total / tasks * 1e6 if tasks else 0.0:12.0f}"
    )
    return "\n".join(lines)


async def rows_read(env: Env) -> int:
    """Rows Postgres read in the benchmark's database so far (``tup_returned + tup_fetched``).

    Postgres publishes these counters about once a second; call :func:`settle_stats` first.
    """
    value = await env.admin.fetchval(
        "SELECT tup_returned + tup_fetched FROM pg_stat_database WHERE datname = $1", env.dbname
    )
    return int(value or 0)


async def reads_by_table(env: Env) -> dict[str, int]:
    """Rows read per table (sequential scans' and index fetches'), for telling where they go."""
    conn = await env.connect()
    try:
        rows = await conn.fetch(
            "SELECT relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS n"
            " FROM pg_stat_user_tables"
        )
    finally:
        await conn.close()
    return {r["relname"]: int(r["n"]) for r in rows}


async def settle_stats() -> None:
    await anyio.sleep(1.2)  # let the backends flush their statistics (PGSTAT_MIN_INTERVAL: 1 s)


# ------------------------------------------------------------------------------ stream side


class Tracker:
    """Reads the events stream; notes when (and at which entry) each terminal event arrived."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self.done: dict[str, float] = {}
        self.entry: dict[str, str] = {}
        self.failed = 0

    async def run(self) -> None:
        cursor = "$"
        while True:
            reply: Any = await self.redis.xread({self.keys.events: cursor}, count=2000, block=1000)
            now = time.perf_counter()
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    cursor = text(entry_id)
                    raw = fields[EVENT_FIELD.encode()]
                    if b"task." not in raw[:40] or b"task.started" in raw[:40]:
                        continue
                    event = decode_event(raw)
                    tag = event.__struct_config__.tag
                    if tag in TERMINAL_TASK:
                        self.done[event.request_id] = now
                        self.entry[event.request_id] = cursor
                        if tag != "task.succeeded":
                            self.failed += 1

    async def wait_for(self, ids: Iterable[str], timeout: float) -> None:
        ids = list(ids)
        with anyio.fail_after(timeout):
            while not all(i in self.done for i in ids):
                await anyio.sleep(0.005)


async def group_done(redis: aioredis.Redis, stream: str, group: str, last: str) -> bool:
    """Whether ``group`` was delivered everything up to ``last`` and acknowledged all of it."""
    groups: Any = await redis.xinfo_groups(stream)
    found = next((g for g in groups if text(g["name"]) == group), None)
    if found is None or id_key(text(found["last-delivered-id"])) < id_key(last):
        return False
    return not int(found["pending"])


async def wait_group_done(
    redis: aioredis.Redis,
    stream: str,
    group: str,
    last: str,
    timeout: float,
    alive: Callable[[], None] = lambda: None,
) -> float:
    """Wait until :func:`group_done`; returns the moment it was (polled every 2 ms)."""
    with anyio.fail_after(timeout):
        while not await group_done(redis, stream, group, last):
            alive()
            await anyio.sleep(0.002)
    return time.perf_counter()


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def projected_through(redis: aioredis.Redis, stream: str, target: str) -> bool:
    """Whether the projector has committed everything up to stream id ``target``.

    It acknowledges a batch only after its transaction committed, so: delivered that far and
    nothing at or below ``target`` still pending.
    """
    groups: Any = await redis.xinfo_groups(stream)
    group = next((g for g in groups if text(g["name"]) == PROJECTOR_GROUP), None)
    if group is None or id_key(text(group["last-delivered-id"])) < id_key(target):
        return False
    summary: Any = await redis.xpending(stream, PROJECTOR_GROUP)
    return not summary["pending"] or id_key(text(summary["min"])) > id_key(target)


async def wait_projected(
    redis: aioredis.Redis,
    stream: str,
    target: str,
    timeout: float,
    alive: Callable[[], None] = lambda: None,
) -> float:
    """Wait until the projector committed through ``target``; returns the moment it had."""
    with anyio.fail_after(timeout):
        while not await projected_through(redis, stream, target):
            alive()
            await anyio.sleep(0.002)
    return time.perf_counter()


# ---------------------------------------------------------------------------------- payloads


def add_task() -> TaskCommand:
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


def task_events(identifier: str, node: str = "bench-node") -> tuple[bytes, bytes]:
    """A ``task.started`` and ``task.succeeded`` pair like the worker emits for a calc add."""
    request_id, at = new_request_id(), now_rfc3339()
    started = TaskStarted(
        event_id=new_event_id(),
        request_id=request_id,
        tenant_id="default",
        at=at,
        node=node,
        plugin_id="acme/calc",
        identifier=identifier,
        access="tool",
        action="invoke_tool",
        attempt=1,
    )
    succeeded = TaskSucceeded(
        event_id=new_event_id(),
        request_id=request_id,
        tenant_id="default",
        at=at,
        node=node,
        plugin_id=identifier,
        result=TaskResult(chunks=[{"type": "text", "message": {"text": "3"}, "meta": None}]),
        duration_ms=1.234,
    )
    return encode(started), encode(succeeded)


async def prefill_events(
    redis: aioredis.Redis, stream: str, pairs: int, identifier: str, chunk: int = 2000
) -> str:
    """XADD ``pairs`` task event pairs to ``stream``; returns the last entry id."""
    last = "0-0"
    for offset in range(0, pairs, chunk):
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(min(chunk, pairs - offset)):
                for raw in task_events(identifier):
                    pipe.xadd(stream, {EVENT_FIELD: raw})
            ids = await pipe.execute()
        last = text(ids[-1])
    return last


# ------------------------------------------------------------------------------ no-op queue

_NOOP_CONSUMER = r"""
import asyncio, sys
import redis.asyncio as aioredis
async def main(url, stream, group, name):
    r = aioredis.Redis.from_url(url)
    await r.xgroup_createconsumer(stream, group, name)
    while True:
        reply = await r.xreadgroup(group, name, {stream: ">"}, count=10, block=1000)
        for _s, entries in reply or []:
            for entry_id, _fields in entries:
                await r.xack(stream, group, entry_id)   # the task: nothing, then its ack
asyncio.run(main(*sys.argv[1:]))
"""


async def noop_baseline(
    redis: aioredis.Redis, prefix: str, count: int, consumers: int = 2
) -> float:
    """Entries/s of a bare XADD -> XREADGROUP -> XACK queue on the same Redis.

    Two consumer processes each read up to 10 entries at a time and acknowledge each entry with
    its own XACK, as a task queue running a task that does nothing; the producer publishes in
    pipelined batches of 200, as the plugind benchmark does. Timed from the first publish to
    the moment the group has nothing pending and has delivered the last entry.
    """
    stream, group = f"{{{prefix}}}:noop", "noop"
    await redis.xgroup_create(stream, group, id="$", mkstream=True)
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 - started before the clock runs
            [sys.executable, "-c", _NOOP_CONSUMER, REDIS_URL, stream, group, f"c{i}"],
        )
        for i in range(consumers)
    ]
    try:
        await _wait_consumers(redis, stream, group, consumers)
        payload = encode(add_task())
        start = time.perf_counter()
        last = "0-0"
        for offset in range(0, count, 200):
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(min(200, count - offset)):
                    pipe.xadd(stream, {"cmd": payload})
                last = text((await pipe.execute())[-1])
        end = await wait_group_done(redis, stream, group, last, 300)
        return count / (end - start)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        await redis.delete(stream)


async def _wait_consumers(redis: aioredis.Redis, stream: str, group: str, n: int) -> None:
    with anyio.fail_after(30):
        while True:
            consumers: Any = await redis.xinfo_consumers(stream, group)
            if len(consumers) >= n:
                return
            await asyncio.sleep(0.05)
