"""The ``plugind`` command.

Exit codes: 0 success, 1 the operation failed (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio

from plugind import __version__
from plugind.cli.commands import (
    cmd_events,
    cmd_install,
    cmd_invoke,
    cmd_migrate,
    cmd_package,
    cmd_serve,
    cmd_status,
    cmd_uninstall,
)
from plugind.cli.import_dify import cmd_import_dify
from plugind.cli.ops import cmd_audit, cmd_dlq
from plugind.cli.projections import cmd_rebuild, cmd_replay
from plugind.config import load_settings
from plugind.errors import CliError, ConfigError

Command = Callable[[argparse.Namespace], Awaitable[int]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plugind",
        description="Install Dify plugin packages and run plugin tasks over Redis Streams.",
        epilog="Configuration comes from the environment (see docs/configuration.md). With "
        "REDIS_URL/DATABASE_URL unset, embedded Valkey and Postgres under ./.plugind/ are used.",
    )
    parser.add_argument("--version", action="version", version=f"plugind {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Command, help_: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    p = add(
        "serve",
        cmd_serve,
        "Run the daemon (all roles by default).",
        "plugind serve --role worker,projector",
    )
    p.add_argument(
        "--role",
        default="worker,projector,api,gateway",
        help="comma-separated roles: worker, projector, api, gateway (default: all)",
    )

    add("migrate", cmd_migrate, "Apply database migrations.", "plugind migrate")

    p = add(
        "package",
        cmd_package,
        "Build a .difypkg from a plugin folder and print its identifier.",
        "plugind package examples/plugins/calc -o calc.difypkg",
    )
    p.add_argument("dir", type=Path, help="the plugin folder (with manifest.yaml)")
    p.add_argument(
        "-o", "--output", type=Path, help="output file (default: <name>-<version>.difypkg)"
    )
    p.add_argument(
        "--sign",
        type=Path,
        metavar="PRIVATE_KEY",
        help="sign the package the way Dify does, with this RSA private key (PEM)",
    )

    p = add(
        "install",
        cmd_install,
        "Publish an install command for a .difypkg.",
        "plugind install calc.difypkg --tenant t1 --wait",
    )
    p.add_argument("file", type=Path, help="the .difypkg file")
    _common_publish(p)

    p = add(
        "uninstall",
        cmd_uninstall,
        "Publish an uninstall command.",
        "plugind uninstall acme/calc --wait",
    )
    p.add_argument("plugin_id", help="author/name")
    _common_publish(p)

    p = add(
        "invoke",
        cmd_invoke,
        "Publish a tool task; with --wait print the result.",
        "plugind invoke acme/calc calc add a=1 b=2 --wait",
    )
    p.add_argument("plugin_id", help="author/name or author/name:version@checksum")
    p.add_argument("provider", help="the tool provider's name")
    p.add_argument("tool", help="the tool's name")
    p.add_argument(
        "params",
        nargs="*",
        metavar="key=value",
        help="tool parameters; values are JSON when they parse as JSON, else strings",
    )
    p.add_argument("--user", default="cli", help="user_id passed to the plugin (default: cli)")
    p.add_argument("--credential", action="append", default=[], metavar="key=value")
    p.add_argument("--task-timeout", type=float, help="timeout_s of the task")
    _common_publish(p)

    p = add(
        "events",
        cmd_events,
        "Read the event log (Postgres), or follow the events stream.",
        "plugind events --type task.failed --since 2026-11-01T00:00:00Z",
    )
    p.add_argument("--follow", "-f", action="store_true", help="follow new events as they come")
    p.add_argument("--type", dest="type_", metavar="TYPE", help="only this event type")
    p.add_argument("--plugin", help="only this plugin (author/name)")
    p.add_argument("--request", help="only this request_id")
    p.add_argument("--since", help="RFC 3339 time or log position")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = add(
        "dlq",
        cmd_dlq,
        "Inspect dead letters, publish them again (under new request ids), or purge them.",
        "plugind dlq list; plugind dlq retry 1795892996997-0; plugind dlq purge --all",
    )
    p.add_argument("action", choices=("list", "retry", "purge"))
    p.add_argument("ids", nargs="*", metavar="ID", help="dead-letter entry ids")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.add_argument("--json", action="store_true", help="list as JSON lines")

    p = add(
        "audit",
        cmd_audit,
        "Check the event log's hash chain from genesis and the projector's head hash, and that "
        "a rebuild from the log equals the live read models.",
        "plugind audit verify",
    )
    p.add_argument("check", choices=("verify",))

    p = add(
        "replay",
        cmd_replay,
        "Show the state (plugins, tasks) as it was at a point of the event log, from events alone.",
        "plugind replay --until 2026-11-28T12:00:00Z",
    )
    p.add_argument("--until", help="a log position (digits) or an RFC 3339 time (default: now)")
    p.add_argument("--json", action="store_true", help="the whole state as JSON")

    p = add(
        "projections",
        cmd_rebuild,
        "Rebuild the read models (plugins, tasks) from the event log, with progress.",
        "plugind projections rebuild",
    )
    p.add_argument("action", choices=("rebuild",))
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = add(
        "import-dify",
        cmd_import_dify,
        "Install for each tenant the plugins that Dify's own plugin daemon had installed "
        "(read from its database and package storage; it is left unchanged).",
        "plugind import-dify --storage /app/storage --wait",
    )
    p.add_argument(
        "--storage",
        help="the upstream daemon's storage root, holding plugin_packages/ (default: "
        "$PLUGIN_STORAGE_LOCAL_ROOT, else /app/storage)",
    )
    p.add_argument(
        "--database-url",
        help="the upstream daemon's database (default: DATABASE_URL, as both share dify_plugin)",
    )
    p.add_argument(
        "--tenant", action="append", default=[], help="only this tenant (may be repeated)"
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be installed")
    p.add_argument("--wait", action="store_true", help="wait for each install to end")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds --wait waits for each (default 600)"
    )

    add(
        "status",
        cmd_status,
        "Streams, groups, pending, lag, consumers, dead letters, projector, and the plugin "
        "pools of the live worker nodes.",
        "plugind status",
    )
    return parser


def _common_publish(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", default="default", help="tenant_id (default: default)")
    p.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    p.add_argument("--wait", action="store_true", help="wait for the terminal event")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds --wait waits (default 120)"
    )
    p.add_argument("--json", action="store_true", help="with --wait: the terminal event as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.settings = load_settings()
    except ConfigError as exc:
        print(f"plugind: {exc}", file=sys.stderr)
        return 2
    func: Command = args.func
    try:
        return anyio.run(func, args)
    except (CliError, ConfigError) as exc:
        print(f"plugind: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        return 130
