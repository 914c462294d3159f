"""``plugind replay`` and ``plugind projections rebuild``: the read models recomputed from the log.

Both read only Postgres (the event log is the source of truth); neither touches Redis or runs a
plugin, so they are safe against a live daemon.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import orjson

from plugind.cli.support import database
from plugind.errors import CliError
from plugind.projections.queries import rfc3339
from plugind.projections.rebuild import RebuildResult, rebuild_read_models
from plugind.projections.replay import Progress, ReplayState, state_at


def parse_until(value: str | None) -> tuple[int | None, datetime | None]:
    """``--until``: a log position (digits) or an RFC 3339 time; None/empty is the head."""
    if value is None or not value.strip():
        return None, None
    value = value.strip()
    if value.isdigit():
        return int(value), None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise CliError(
            f"--until {value!r} is neither a log position nor an RFC 3339 time "
            "(e.g. 2026-01-31T12:00:00Z)",
            exit_code=2,
        ) from None
    return None, parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


async def cmd_replay(args: argparse.Namespace) -> int:
    """Print the plugins per tenant and the task counts as of ``args.until``."""
    until_position, until_time = parse_until(args.until)
    async with database(args.settings) as conn:
        state = await state_at(conn, until_position=until_position, until_time=until_time)
    if args.json:
        sys.stdout.write(orjson.dumps(state.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_state(state))
    return 0


def render_state(state: ReplayState) -> str:
    lines = [
        f"State at position {state.position}"
        + (f" ({rfc3339(state.at)})" if state.at is not None else "")
        + f", from {state.events} logged event(s)"
        + (f", {state.skipped} change(s) skipped" if state.skipped else "")
    ]
    if not state.plugins:
        lines.append("plugins: none")
    for tenant, plugins in state.plugins.items():
        lines.append(f"tenant {tenant}:")
        width = max(len(p.plugin_id) for p in plugins)
        for p in plugins:
            lines.append(f"  {p.plugin_id:<{width}}  {p.version:<10} {p.status:<11} {p.identifier}")
    counts = state.task_counts()
    detail = ", ".join(f"{status} {n}" for status, n in counts.items())
    lines.append(f"tasks: {len(state.tasks)}" + (f" ({detail})" if detail else ""))
    return "\n".join(lines) + "\n"


async def cmd_rebuild(args: argparse.Namespace) -> int:
    """Rebuild the read models; a progress bar on a terminal, quiet when piped."""
    async with database(args.settings) as conn:
        with _progress_bar(enabled=sys.stdout.isatty()) as progress:
            result = await rebuild_read_models(conn, progress=progress)
    if args.json:
        sys.stdout.write(orjson.dumps(result.to_dict()).decode() + "\n")
    else:
        sys.stdout.write(render_rebuild(result) + "\n")
    return 0


def render_rebuild(result: RebuildResult) -> str:
    skipped = f" ({result.skipped} change(s) skipped, see the log)" if result.skipped else ""
    return (
        f"Rebuilt the read models from {result.events} logged event(s) up to position "
        f"{result.head_position} in {result.duration_s:.2f}s: {result.plugins} plugin row(s), "
        f"{result.tasks} task row(s){skipped}"
    )


@contextmanager
def _progress_bar(*, enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    from rich import progress as rp

    columns = (
        rp.TextColumn("Rebuilding read models"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(),
    )
    with rp.Progress(*columns, transient=True) as bar:
        task = bar.add_task("rebuild", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
