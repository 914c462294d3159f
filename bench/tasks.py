"""Benchmark: real-plugin tool tasks through the whole daemon, next to a no-op queue baseline.

Runs on the Redis and Postgres given by ``REDIS_URL`` / ``DATABASE_URL`` (else the local ones),
each part in a fresh namespace and database, dropped afterwards:

0. baseline: a bare XADD -> XREADGROUP -> XACK queue with two consumer processes on the same
   Redis, each task doing nothing. plugind's rates are also given as a ratio of it: absolute
   figures on a shared machine drift from run to run, the ratio much less;
1. throughput: starts ``plugind serve`` processes (``--roles``: by default two worker processes
   and a projector), installs the example calc plugin, publishes ``--tasks`` add tasks at once
   and reports tasks/s from the first publish to the last terminal event on the stream, and to
   the moment the last task's row was committed in Postgres, with the CPU each part used and
   the rows Postgres read per task;
2. latency: publishes one task at a time at ``--rate`` for ``--seconds``; p50/p99 from publish
   to the terminal event on the stream;
3. projector alone: pre-fills an events stream with ``--projector-events`` task events (pairs
   of ``task.started``/``task.succeeded``), then starts a projector and times the drain into
   ``event_log`` and the read models.

``--quick`` (or ``BENCH_QUICK=1``) runs smaller sizes, for a smoke test. Every figure is also
printed as one ``BENCH {json}`` line; a summary compares them with issue 8's targets. The
1,000,000-row and 10-minute benchmarks are ``bench/scale.py`` (``make bench-scale``).

    python bench/tasks.py --tasks 6000 --rate 100 --seconds 10 --workers 128 \\
        --roles worker+worker+projector
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis.asyncio as aioredis
from _common import (
    REDIS_URL,
    REPO,
    CpuMeter,
    Env,
    Report,
    Tracker,
    add_task,
    cpu_table,
    fresh_env,
    machine,
    noop_baseline,
    percentile,
    prefill_events,
    ratio,
    reads_by_table,
    rows_read,
    say,
    settle_stats,
    wait_group_done,
    wait_projected,
)

from plugind.bus.codec import command_fields, text
from plugind.bus.keys import PROJECTOR_GROUP, WORKERS_GROUP
from plugind.client import Client
from plugind.package.difypkg import build_package

TARGETS = {
    "tasks_per_s_to_postgres": (">=", 2500.0),
    "latency_p50": ("<=", 2.0),
    "latency_p99": ("<=", 10.0),
    "projector_events_per_s": (">=", 20000.0),
}


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    processes = args.roles.split("+")
    workers = sum("worker" in p.split(",") for p in processes)
    return {
        "daemon processes (--role of each)": processes,
        "worker processes": workers,
        "handlers per worker process (PLUGIN_WORKER_COUNT)": args.workers,
        "processes per plugin per worker process (PLUGIN_INSTANCES)": args.instances,
        "plugin processes in all": workers * args.instances,
        "tasks": args.tasks,
        "rate (tasks/s)": args.rate,
        "seconds at that rate": args.seconds,
        "projector events": args.projector_events,
    }


async def start_daemons(env: Env, args: argparse.Namespace) -> str:
    """Start the ``--roles`` processes and install calc; returns its identifier."""
    for roles in args.roles.split("+"):
        env.start(
            roles,
            PLUGIN_WORKER_COUNT=str(args.workers),
            PLUGIN_INSTANCES=str(args.instances),
        )
    client = Client(env.redis, env.keys)
    installed = await client.wait(
        await client.install(build_package(REPO / "examples/plugins/calc")), 600
    )
    identifier = getattr(installed, "identifier", None)
    if not isinstance(identifier, str):
        raise SystemExit(f"installing the calc plugin failed: {installed}")
    say(f"installed: {identifier}")
    # warm-up: every plugin process started, every pool and connection in use once
    async with tracking(env) as tracker:
        warm = await client.send_many([add_task() for _ in range(args.workers * 4)])
        await tracker.wait_for(warm, 180)
    return identifier


async def run_tasks(
    env: Env, count: int, report: Report, baseline: float, *, label: str = ""
) -> dict[str, float]:
    """Publish ``count`` tasks at once (in pipelined batches of 200, as a busy producer would).

    Nothing reads the events meanwhile (a tracker decoding two events per task would compete
    for the same cores): the terminal commit acknowledges the command in the same script, so
    the last terminal event is on the stream once the workers' group has acknowledged every
    command, and its row is in Postgres once the projector has acknowledged that event (it
    acknowledges only after its commit).
    """
    cpu = CpuMeter(env)
    await settle_stats()
    rows_before = await rows_read(env)
    tables_before = await reads_by_table(env)
    rss_before = {d.roles: d.rss_mb() for d in env.daemons}
    await cpu.start()
    start = time.perf_counter()
    last_command = "0-0"
    for offset in range(0, count, 200):
        batch = [add_task() for _ in range(min(200, count - offset))]
        async with env.redis.pipeline(transaction=False) as pipe:
            for command in batch:
                pipe.xadd(env.keys.tasks, command_fields(command))
            last_command = text((await pipe.execute())[-1])
    timeout = max(300.0, count / 100)
    stream_end = await wait_group_done(
        env.redis, env.keys.tasks, WORKERS_GROUP, last_command, timeout, env.check_alive
    )
    newest: Any = await env.redis.xrevrange(env.keys.events, count=1)
    last_event = text(newest[0][0])
    db_end = await wait_projected(env.redis, env.keys.events, last_event, timeout, env.check_alive)
    used = await cpu.stop()
    await settle_stats()
    rows = await rows_read(env) - rows_before
    tables = await reads_by_table(env)
    by_table = {
        t: round((n - tables_before.get(t, 0)) / count, 2)
        for t, n in tables.items()
        if n - tables_before.get(t, 0)
    }
    failed = await failed_tasks(env)
    stream_s, db_s = stream_end - start, db_end - start
    rss = {d.roles: f"{rss_before.get(d.roles, 0):.0f} -> {d.rss_mb():.0f}" for d in env.daemons}
    say(
        f"throughput{label}: {count} tasks, {failed} not succeeded\n"
        f"  to the terminal event on the stream: {stream_s:6.2f} s = "
        f"{count / stream_s:6.0f} tasks/s  ({ratio(count / stream_s, baseline)})\n"
        f"  to the row committed in Postgres:    {db_s:6.2f} s = "
        f"{count / db_s:6.0f} tasks/s  ({ratio(count / db_s, baseline)})\n"
        f"  Postgres rows read per task: {rows / count:.1f} (by table: {by_table})\n"
        f"  daemon RSS, MB (the last of each role): {rss}\n"
        f"  CPU while it ran ({db_s:.1f} s wall):\n{cpu_table(used, count, db_s)}"
    )
    extra = {"tasks": count, "failed": failed}
    report.figure("tasks_per_s_to_stream", count / stream_s, "tasks/s", baseline=baseline, **extra)
    report.figure("tasks_per_s_to_postgres", count / db_s, "tasks/s", baseline=baseline, **extra)
    report.figure("pg_rows_read_per_task", rows / count, "rows", **extra)
    report.figure(
        "cpu_us_per_task",
        sum(used.values()) / count * 1e6,
        "us",
        parts={k: round(v / count * 1e6) for k, v in used.items()},
        **extra,
    )
    return {"stream_rate": count / stream_s, "db_rate": count / db_s, "rows": rows / count}


async def failed_tasks(env: Env) -> int:
    """Tasks whose row is not ``succeeded`` (read after the clock stopped)."""
    conn = await env.connect()
    try:
        return int(await conn.fetchval("SELECT count(*) FROM tasks WHERE status <> 'succeeded'"))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def tracking(env: Env) -> AsyncIterator[Tracker]:
    """A :class:`Tracker` reading the events stream while the block runs."""
    tracker = Tracker(env.redis, env.keys)
    async with anyio.create_task_group() as tg:
        tg.start_soon(tracker.run)
        await anyio.sleep(0.2)
        yield tracker
        tg.cancel_scope.cancel()


async def run_latency(env: Env, rate: float, seconds: float, report: Report) -> None:
    client = Client(env.redis, env.keys)
    async with tracking(env) as tracker:
        paced: list[tuple[str, float]] = []
        interval = 1.0 / rate
        begin = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = begin + i * interval - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            sent_at = time.perf_counter()
            rid = await client.invoke_tool(
                "acme/calc", "calc", "add", {"a": 1, "b": 2}, user_id="bench"
            )
            paced.append((rid, sent_at))
        await tracker.wait_for([rid for rid, _ in paced], 120)
    lat = [(tracker.done[rid] - sent_at) * 1000 for rid, sent_at in paced]
    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
    say(
        f"latency at {rate:g} tasks/s over {len(lat)} tasks (publish -> terminal event):"
        f" p50 {p50:.1f} ms, p99 {p99:.1f} ms, mean {statistics.fmean(lat):.1f} ms,"
        f" max {max(lat):.1f} ms"
    )
    report.figure("latency_p50", p50, "ms", rate=rate, tasks=len(lat))
    report.figure("latency_p99", p99, "ms", rate=rate, tasks=len(lat))


async def bench_daemon(args: argparse.Namespace, report: Report, baseline: float) -> str:
    async with fresh_env() as env:
        identifier = await start_daemons(env, args)
        await run_tasks(env, args.tasks, report, baseline)
        if args.seconds > 0:
            await run_latency(env, args.rate, args.seconds, report)
    return identifier


async def bench_projector(events: int, identifier: str, report: Report, baseline: float) -> None:
    """Pre-fill the events stream, then time one projector draining it."""
    async with fresh_env("benchproj") as env:
        pairs = events // 2
        say(f"projector alone: pre-filling {pairs * 2} events ...")
        last = await prefill_events(env.redis, env.keys.events, pairs, identifier)
        await settle_stats()
        env.start("projector")
        # the clock starts when the projector creates its group, right before its first read
        with anyio.fail_after(120):
            while True:
                env.check_alive()
                groups: Any = await env.redis.xinfo_groups(env.keys.events)
                if any(text(g["name"]) == PROJECTOR_GROUP for g in groups):
                    break
                await anyio.sleep(0.002)
        cpu = CpuMeter(env)
        await cpu.start()
        rows_before = await rows_read(env)
        start = time.perf_counter()
        end = await wait_projected(env.redis, env.keys.events, last, 900, env.check_alive)
        used = await cpu.stop()
        await settle_stats()
        rows = await rows_read(env) - rows_before
        n = pairs * 2
        rate = n / (end - start)
        say(
            f"projector alone: {n} events in {end - start:.2f} s = {rate:.0f} events/s"
            f" ({ratio(rate, baseline)}), Postgres rows read per event {rows / n:.1f}\n"
            f"  CPU while it ran:\n"
            + cpu_table(used, n, end - start).replace("CPU µs/task", "CPU µs/event")
        )
        report.figure("projector_events_per_s", rate, "events/s", baseline=baseline, events=n)


def summary(report: Report) -> str:
    lines = [
        "summary (targets: issue 8; the ratio is to the no-op queue of this run):",
        f"  {'figure':<26} {'measured':>12} {'target':>10} {'ratio':>7}  ",
    ]
    for row in report.figures:
        name = row["name"]
        if name in ("settings", "noop_queue_per_s", "cpu_us_per_task"):
            continue
        target = TARGETS.get(name)
        verdict = ""
        if target is not None:
            op, value = target
            met = row["value"] >= value if op == ">=" else row["value"] <= value
            verdict = "met" if met else "NOT met"
        lines.append(
            f"  {name:<26} {row['value']:>12,.1f} "
            f"{(target[0] + ' ' + format(target[1], ',g')) if target else '':>10} "
            f"{row.get('ratio_to_baseline', ''):>7}  {verdict}"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    report = Report("tasks")
    settings = settings_of(args)
    say(f"machine: {machine()}")
    say("settings:\n" + "\n".join(f"  {k}: {v}" for k, v in settings.items()))
    report.figure("settings", 0, "", settings=settings, machine=machine())

    baseline = 0.0
    if "baseline" in args.parts:
        redis = aioredis.Redis.from_url(REDIS_URL)
        try:
            baseline = await noop_baseline(redis, f"benchnoop-{os.getpid()}", args.tasks)
        finally:
            await redis.aclose()
        say(
            "baseline: no-op queue (XADD -> XREADGROUP -> XACK, 2 consumer processes): "
            f"{baseline:.0f} tasks/s"
        )
        report.figure("noop_queue_per_s", baseline, "tasks/s", tasks=args.tasks)

    identifier = "acme/calc:0.1.0@" + "0" * 64
    if "tasks" in args.parts:
        identifier = await bench_daemon(args, report, baseline)
    if "projector" in args.parts and args.projector_events:
        await bench_projector(args.projector_events, identifier, report, baseline)
    say(summary(report))
    say(f"machine at the end: {machine()}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    parser.add_argument("--quick", action="store_true", default=quick, help="small sizes")
    parser.add_argument("--tasks", type=int, help="tasks published at once (6000; quick 2000)")
    parser.add_argument("--rate", type=float, default=100.0, help="tasks/s of the latency run")
    parser.add_argument("--seconds", type=float, help="length of the latency run (10; quick 3)")
    parser.add_argument("--workers", type=int, default=128, help="PLUGIN_WORKER_COUNT (128)")
    parser.add_argument("--instances", type=int, default=1, help="PLUGIN_INSTANCES (1)")
    parser.add_argument(
        "--roles",
        default="worker+worker+projector",
        help="daemon processes to start, '+'-separated, each with its ','-separated roles "
        "(default: worker+worker+projector, i.e. two worker processes and a projector)",
    )
    parser.add_argument(
        "--projector-events", type=int, help="events of the projector run (40000; quick 10000)"
    )
    parser.add_argument(
        "--parts",
        default="baseline,tasks,projector",
        help="what to run, ','-separated: baseline, tasks (throughput and latency), projector",
    )
    args = parser.parse_args()
    if args.tasks is None:
        args.tasks = 2000 if args.quick else 6000
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 10.0
    if args.projector_events is None:
        args.projector_events = 10000 if args.quick else 40000
    args.parts = set(args.parts.split(","))
    return args


if __name__ == "__main__":
    anyio.run(main, parse_args())
