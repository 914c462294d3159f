"""The ``plugind`` command as a user runs it: a separate process against a running daemon."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from e2e import EXAMPLE_CALC, REPO, eventually, run_cli
from plugin_factory import ECHO, package_bytes, write_plugin

from plugind.cli.main import _parser
from plugind.config import Settings
from plugind.daemon import Daemon

pytestmark = pytest.mark.anyio


async def test_package_install_invoke_events_status(
    daemon: Daemon, settings: Settings, tmp_path: Path
) -> None:
    target = tmp_path / "calc.difypkg"
    _, out, _ = await run_cli(settings, "package", str(EXAMPLE_CALC), "-o", str(target))
    identifier = out.strip()
    assert identifier.startswith("acme/calc:0.1.0@") and target.is_file()

    _, out, _ = await run_cli(settings, "install", str(target), "--wait")
    assert orjson.loads(out)["identifier"] == identifier

    _, out, _ = await run_cli(
        settings, "invoke", "acme/calc", "calc", "add", "a=2", "b=40", "--wait"
    )
    assert out.splitlines() == ['{"sum":42}', "42"]

    code, out, _ = await run_cli(
        settings,
        "invoke",
        "acme/calc",
        "calc",
        "divide",
        "a=1",
        "b=0",
        "--wait",
        "--json",
        check=False,
    )
    assert code == 1
    failed = orjson.loads(out)
    assert failed["type"] == "task.failed" and failed["error"]["code"] == "plugin_error"

    assert settings.database_url is not None
    await eventually(
        settings.database_url,
        "SELECT status FROM tasks WHERE request_id = $1",
        failed["request_id"],
        expect="failed",
    )
    _, out, _ = await run_cli(settings, "events", "--type", "task.failed", "--json")
    events = [orjson.loads(line) for line in out.splitlines()]
    assert [e["request_id"] for e in events] == [failed["request_id"]]

    _, out, _ = await run_cli(settings, "audit", "verify")
    assert orjson.loads(out)["ok"] is True

    _, out, _ = await run_cli(settings, "replay", "--json")
    assert "acme/calc" in out
    _, out, _ = await run_cli(settings, "projections", "rebuild", "--json")
    assert orjson.loads(out)["events"] > 0

    _, out, _ = await run_cli(settings, "status")
    status = orjson.loads(out)
    tasks = status["streams"][daemon.keys.tasks]
    assert tasks["length"] == 2 and tasks["pending"] == 0


async def test_usage_errors_exit_2(settings: Settings, tmp_path: Path) -> None:
    code, _, err = await run_cli(settings, "invoke", "a/b", "p", "t", "novalue", check=False)
    assert code == 2 and "key=value" in err
    code, _, err = await run_cli(settings, "package", str(tmp_path), check=False)
    assert code == 2 and "manifest.yaml" in err
    code, _, err = await run_cli(settings, "frobnicate", check=False)
    assert code == 2
    env_code = await anyio.run_process(
        [sys.executable, "-m", "plugind.cli", "status"],
        env=dict(os.environ, PLUGIN_WORKER_COUNT="four"),
        check=False,
    )
    assert env_code.returncode == 2
    assert b"PLUGIN_WORKER_COUNT must be an integer" in env_code.stderr


async def test_serve_gives_up_on_an_unreachable_redis_with_one_clear_line() -> None:
    result = await anyio.run_process(
        [sys.executable, "-m", "plugind.cli", "serve"],
        env=dict(
            os.environ,
            REDIS_URL="redis://127.0.0.1:1/0",
            DATABASE_URL="postgresql://u:secret@127.0.0.1:1/x",
            PLUGIND_CONNECT_TIMEOUT="1",
        ),
        check=False,
    )
    assert result.returncode == 1
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("plugind: REDIS_URL: cannot connect to redis://127.0.0.1:1/0")


async def test_a_large_package_travels_through_the_store(
    daemon: Daemon, settings: Settings, tmp_path: Path, client: Any
) -> None:
    folder = write_plugin(tmp_path / "big", name="big", tools={"echo": ECHO})
    (folder / "_assets" / "noise.bin").write_bytes(os.urandom(1536 * 1024))  # incompressible
    target = tmp_path / "big.difypkg"
    target.write_bytes(package_bytes(folder))
    _, out, _ = await run_cli(settings, "install", str(target), "--wait", "--json")
    installed = orjson.loads(out)
    assert installed["type"] == "plugin.installed", installed
    [started] = [
        e
        for e in await client.events_of(installed["request_id"])
        if e.__struct_config__.tag == "plugin.install_started"
    ]
    assert started.source.startswith("sha256:")
    entries = await client.redis.xrange(daemon.keys.install)
    assert all(len(fields[b"cmd"]) < 4096 for _id, fields in entries)


POSTGRES_COMMANDS = [
    ["migrate"],
    ["events"],
    ["audit", "verify"],
    ["replay"],
    ["projections", "rebuild"],
    ["import-dify", "--dry-run"],
]


@pytest.mark.parametrize("argv", POSTGRES_COMMANDS, ids=lambda argv: argv[0])
def test_commands_that_need_postgres_say_what_is_wrong_in_one_line(
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Every one of them connects through ``cli.support.database``: no traceback, no password."""
    from plugind.cli.main import main

    monkeypatch.chdir(tmp_path)  # no embedded daemon's runtime.json to fall back on
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines() == [
        "plugind: DATABASE_URL is not set and no embedded daemon is running here "
        f"(no {tmp_path}/.plugind/runtime.json); start one with `plugind serve`"
    ]

    monkeypatch.setenv("DATABASE_URL", "postgresql://u:secret@127.0.0.1:1/x")
    assert main(argv) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("plugind: cannot connect to "), line
    assert "postgresql://u:***@127.0.0.1:1/x" in line and "secret" not in line


async def test_an_unmigrated_database_is_named_as_such(database_url: str) -> None:
    for argv in (["events"], ["replay"]):
        result = await anyio.run_process(
            [sys.executable, "-m", "plugind.cli", *argv],
            env=dict(os.environ, DATABASE_URL=database_url),
            check=False,
        )
        assert result.returncode == 1, argv
        [line] = result.stderr.decode().splitlines()
        assert line.startswith("plugind: the database is not migrated"), line
        assert line.endswith("run `plugind migrate`")


def test_every_command_has_an_example_and_the_docs_commands_parse() -> None:
    """``plugind --help`` and the docs agree with the parser: each command's help ends with an
    example that parses, and so does every ``plugind …`` line of a shell block in the docs."""
    parser = _parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    examples: list[str] = []
    for name, sub in commands.choices.items():
        epilog = sub.epilog or ""
        assert epilog.startswith(f"example:\n  plugind {name}"), name
        examples += epilog.removeprefix("example:\n  ").split("; ")
    documented: list[str] = []
    for doc in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))):
        for line in _shell_lines(doc.read_text()):
            found = re.match(r"\s*(?:docker compose exec \S+ )?(plugind .*)", line)
            if found:
                documented.append(found.group(1).split(" #")[0].strip())
    assert len(documented) > 10, documented
    for command in examples + documented:
        words = shlex.split(command)
        assert words[0] == "plugind", command
        parser.parse_args(words[1:])  # exits (SystemExit) on a command the parser refuses


def _shell_lines(markdown: str) -> list[str]:
    """The lines of the shell blocks (```sh, ```bash or a bare fence) of a Markdown text."""
    lines: list[str] = []
    language: str | None = None  # None: outside a block
    for line in markdown.splitlines():
        fence = re.match(r"\s*```(\w*)", line)
        if fence:
            language = fence.group(1) if language is None else None
        elif language in ("", "sh", "bash"):
            lines.append(line)
    return lines
