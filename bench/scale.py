"""Benchmark: does the rate hold at a million rows, how long does a rebuild take, is memory flat?

Runs on the Redis and Postgres given by ``REDIS_URL`` / ``DATABASE_URL`` (else the local ones),
each part in a fresh namespace and database, dropped afterwards (``make bench-scale``):

1. grown tables: pre-fills ``tasks`` with ``--prefill`` finished tasks and ``event_log`` with
   their two events each (SQL, about a minute per million tasks), starts the daemons as
   ``bench/tasks.py`` does, then publishes ``--small`` tasks and ``--large`` tasks at once, and
   compares their to-Postgres rates and the Postgres rows read per task;
2. rebuild: pre-fills ``--rebuild-events`` events and times ``plugind projections rebuild``;
3. memory (``--parts soak``, ``make bench-soak``): publishes at ``--soak-rate`` for
   ``--soak-seconds`` and reports each daemon's RSS at the start, every minute and at the end.

``--quick`` (or ``BENCH_QUICK=1``) runs small sizes. Every figure is also printed as one
``BENCH {json}`` line.

    python bench/scale.py --prefill 1000000 --small 6000 --large 100000 \\
        --rebuild-events 1000000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import anyio
from _common import CODE, Report, add_task, fresh_env, machine, say, wait_group_done
from _prefill import prefill
from tasks import run_tasks, settings_of, start_daemons

from plugind.bus.codec import command_fields, text
from plugind.bus.keys import WORKERS_GROUP

IDENTIFIER = "acme/calc:0.1.0@" + "0" * 64


async def bench_grown(args: argparse.Namespace, report: Report) -> None:
    async with fresh_env("benchscale") as env:
        say(f"grown tables: pre-filling {args.prefill:,} tasks ({2 * args.prefill:,} events) ...")
        seconds = await prefill(
            env.database_url,
            tasks=args.prefill,
            events_stream=env.keys.events,
            identifier=IDENTIFIER,
            say=say,
        )
        say(f"  pre-filled in {seconds:.0f} s")
        await start_daemons(env, args)
        small = await run_tasks(env, args.small, report, 0.0, label=f" ({args.prefill:,} rows)")
        large = await run_tasks(env, args.large, report, 0.0, label=f" ({args.prefill:,} rows)")
        change = large["db_rate"] / small["db_rate"] - 1
        say(
            f"grown tables: {args.large:,} tasks ran at {large['db_rate']:.0f} tasks/s to Postgres,"
            f" {args.small:,} at {small['db_rate']:.0f} ({change:+.1%}; target: within 10 %);"
            f" rows read per task {small['rows']:.1f} -> {large['rows']:.1f}"
        )
        report.figure(
            "rate_change_large_vs_small",
            change * 100,
            "%",
            prefill=args.prefill,
            small=args.small,
            large=args.large,
        )


async def bench_rebuild(args: argparse.Namespace, report: Report) -> None:
    async with fresh_env("benchrebuild") as env:
        tasks = args.rebuild_events // 2
        say(f"rebuild: pre-filling {2 * tasks:,} events ...")
        await prefill(
            env.database_url, tasks=tasks, events_stream=env.keys.events, identifier=IDENTIFIER
        )
        started = time.perf_counter()
        done = await anyio.run_process(
            [sys.executable, "-m", "plugind.cli", "projections", "rebuild"],
            env=env.env(),
            cwd=CODE,
            check=False,
        )
        seconds = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"plugind projections rebuild failed:\n{done.stderr.decode()}")
        say(
            f"rebuild: `plugind projections rebuild` of {2 * tasks:,} events took"
            f" {seconds:.1f} s ({2 * tasks / seconds:,.0f} events/s; target: 1,000,000 in 60 s)\n"
            f"  {done.stdout.decode().strip()}"
        )
        report.figure("rebuild_seconds", seconds, "s", events=2 * tasks)
        report.figure("rebuild_events_per_s", 2 * tasks / seconds, "events/s", events=2 * tasks)


async def bench_soak(args: argparse.Namespace, report: Report) -> None:
    async with fresh_env("benchsoak") as env:
        await start_daemons(env, args)
        start_rss = {f"{d.roles}#{i}": d.rss_mb() for i, d in enumerate(env.daemons)}
        say(
            f"memory: {args.soak_rate:g} tasks/s for {args.soak_seconds:.0f} s; RSS (MB) at start:"
            f" {_fmt(start_rss)}"
        )
        interval = 1.0 / args.soak_rate
        begin = time.perf_counter()
        next_report = begin + 60
        sent, last = 0, "0-0"
        while time.perf_counter() - begin < args.soak_seconds:
            env.check_alive()
            # publish in 50 ms slices, so the producer stays cheap at high rates
            due = int((time.perf_counter() - begin) / interval) - sent
            if due > 0:
                async with env.redis.pipeline(transaction=False) as pipe:
                    for _ in range(due):
                        pipe.xadd(env.keys.tasks, command_fields(add_task()))
                    last = text((await pipe.execute())[-1])
                sent += due
            if time.perf_counter() >= next_report:
                next_report += 60
                rss = {f"{d.roles}#{i}": d.rss_mb() for i, d in enumerate(env.daemons)}
                lag: Any = await env.redis.xinfo_groups(env.keys.tasks)
                pending = sum(int(g["pending"]) for g in lag if text(g["name"]) == WORKERS_GROUP)
                say(
                    f"  {time.perf_counter() - begin:5.0f} s: {sent:,} tasks sent, RSS (MB)"
                    f" {_fmt(rss)}, pending {pending}"
                )
            await anyio.sleep(0.05)
        await wait_group_done(env.redis, env.keys.tasks, WORKERS_GROUP, last, 300, env.check_alive)
        end_rss = {f"{d.roles}#{i}": d.rss_mb() for i, d in enumerate(env.daemons)}
        say(f"memory: {sent:,} tasks; RSS (MB) at the end: {_fmt(end_rss)}")
        for name, before in start_rss.items():
            report.figure(
                "rss_mb", end_rss[name], "MB", process=name, start=round(before, 1), tasks=sent
            )


def _fmt(rss: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in rss.items())


async def main(args: argparse.Namespace) -> None:
    report = Report("scale")
    settings = {
        **settings_of(args),
        "pre-filled tasks": args.prefill,
        "small run": args.small,
        "large run": args.large,
        "rebuild events": args.rebuild_events,
        "soak": f"{args.soak_rate:g} tasks/s for {args.soak_seconds:g} s",
        "code": str(CODE),
    }
    say(f"machine: {machine()}")
    say("settings:\n" + "\n".join(f"  {k}: {v}" for k, v in settings.items()))
    report.figure("settings", 0, "", settings=settings, machine=machine())
    if "grown" in args.parts:
        await bench_grown(args, report)
    if "rebuild" in args.parts:
        await bench_rebuild(args, report)
    if "soak" in args.parts:
        await bench_soak(args, report)
    say(f"machine at the end: {machine()}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    parser.add_argument("--quick", action="store_true", default=quick, help="small sizes")
    parser.add_argument("--prefill", type=int, help="finished tasks pre-filled (1,000,000)")
    parser.add_argument("--small", type=int, help="tasks of the small run (6,000)")
    parser.add_argument("--large", type=int, help="tasks of the large run (100,000)")
    parser.add_argument("--rebuild-events", type=int, help="events to rebuild from (1,000,000)")
    parser.add_argument("--soak-rate", type=float, default=1000.0, help="tasks/s (1000)")
    parser.add_argument("--soak-seconds", type=float, help="length of the soak (600)")
    parser.add_argument("--workers", type=int, default=128, help="PLUGIN_WORKER_COUNT (128)")
    parser.add_argument("--instances", type=int, default=1, help="PLUGIN_INSTANCES (1)")
    parser.add_argument(
        "--roles",
        default="worker+worker+projector",
        help="daemon processes, '+'-separated, each with its ','-separated roles",
    )
    parser.add_argument(
        "--parts", default="grown,rebuild", help="grown, rebuild, soak (','-separated)"
    )
    args = parser.parse_args()
    defaults = {
        "prefill": (100_000, 1_000_000),
        "small": (2_000, 6_000),
        "large": (20_000, 100_000),
        "rebuild_events": (100_000, 1_000_000),
        "soak_seconds": (60.0, 600.0),
    }
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    args.parts = set(args.parts.split(","))
    # what bench/tasks.py reports on and settings_of() shows
    args.tasks, args.rate, args.seconds, args.projector_events = args.small, 0.0, 0.0, 0
    return args


if __name__ == "__main__":
    anyio.run(main, parse_args())
