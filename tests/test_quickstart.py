"""The README's quick start, run as a newcomer runs it.

A daemon started as a subprocess in an empty folder with no path settings at all (only the test's
Redis and Postgres, its own namespace and free ports), then every command of the README's quick
start block in order, as subprocesses from that folder. The commands and what they print are read
from the README itself, so the two cannot drift apart:

- ``plugind …`` runs with this interpreter, ``curl -s localhost:5002/…`` as an HTTP GET;
- ``# → TEXT`` after a command is text its output must contain (``<…>`` matches any value);
- ``exit N`` in that comment is its expected exit status (else 0).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
# Every setting that names a path or a service, so the daemon sees only what the test gives it.
_PATH_AND_SERVICE_SETTINGS = ("PLUGIN_DIR", "PLUGIND_DATA_DIR", "REDIS_URL", "DATABASE_URL")


@dataclass(frozen=True)
class Step:
    line: str
    argv: list[str]
    expect: re.Pattern[str] | None
    exit_code: int


def quick_start_steps(readme: str) -> list[Step]:
    section = readme.split("## Quick start", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    steps = []
    for line in block.splitlines():
        command, _, comment = line.partition("  #")
        command = command.strip()
        if not command or command.startswith(". "):
            continue
        exit_match = re.search(r"\bexit (\d+)", comment)
        _, arrow, wanted = comment.partition("→")
        expect = None
        if arrow:
            parts = re.split(r"<[^>]*>", wanted.strip())
            expect = re.compile(r"\S+?".join(re.escape(p) for p in parts))
        steps.append(
            Step(
                line=line.strip(),
                argv=shlex.split(command),
                expect=expect,
                exit_code=int(exit_match.group(1)) if exit_match else 0,
            )
        )
    return steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_readme_block_is_understood() -> None:
    steps = quick_start_steps((REPO / "README.md").read_text())
    programs = {s.argv[0] for s in steps}
    assert programs <= {"plugind", "curl"}, programs
    invoke = next(s for s in steps if s.argv[:4] == ["plugind", "invoke", "acme/calc", "calc"])
    assert invoke.expect is not None and invoke.expect.search('{"sum":3}')
    assert any(s.exit_code == 1 for s in steps)


@pytest.fixture
def newcomer_env(
    redis_url: str, database_url: str, namespace: str
) -> Iterator[tuple[dict[str, str], int]]:
    env = {k: v for k, v in os.environ.items() if k not in _PATH_AND_SERVICE_SETTINGS}
    env = {k: v for k, v in env.items() if not k.startswith(("PLUGIND_", "PLUGIN_"))}
    http_port = _free_port()
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        PLUGIND_NAMESPACE=namespace,
        PLUGIND_HTTP_PORT=str(http_port),
        PLUGIND_GATEWAY_PORT=str(_free_port()),
        PLUGIND_HTTP_HOST="127.0.0.1",
    )
    if "PLUGIN_PYTHON" in os.environ:  # the one machine fact a newcomer may have to give
        env["PLUGIN_PYTHON"] = os.environ["PLUGIN_PYTHON"]
    yield env, http_port


async def _wait_healthy(http: httpx.AsyncClient, daemon: anyio.abc.Process) -> None:
    with anyio.fail_after(60):
        while True:
            assert daemon.returncode is None, "plugind serve exited during start"
            try:
                if (await http.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await anyio.sleep(0.2)


async def _run(
    step: Step, cwd: Path, env: dict[str, str], http: httpx.AsyncClient
) -> tuple[int, str]:
    if step.argv[0] == "curl":
        url = next(a for a in step.argv if "localhost:5002" in a)
        response = await http.get(url.split("localhost:5002", 1)[1])
        return (0 if response.status_code < 400 else 22), response.text
    with anyio.fail_after(300):
        done = await anyio.run_process(
            [sys.executable, "-m", "plugind", *step.argv[1:]], cwd=cwd, env=env, check=False
        )
    return done.returncode, done.stdout.decode() + done.stderr.decode()


@pytest.mark.anyio
async def test_quick_start_in_an_empty_folder(
    tmp_path: Path, newcomer_env: tuple[dict[str, str], int]
) -> None:
    env, port = newcomer_env
    (tmp_path / "examples").symlink_to(REPO / "examples")
    log = (tmp_path / "serve.log").open("wb")
    daemon = await anyio.open_process(
        [sys.executable, "-m", "plugind", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        await _wait_healthy(http, daemon)
        for step in quick_start_steps((REPO / "README.md").read_text()):
            # reads of the projection may trail the stream by a moment: retry those briefly
            deadline = time.monotonic() + 10
            while True:
                code, output = await _run(step, tmp_path, env, http)
                ok = code == step.exit_code and (step.expect is None or step.expect.search(output))
                if ok or time.monotonic() > deadline or step.argv[1] in ("install", "invoke"):
                    break
                await anyio.sleep(0.2)
            assert ok, f"{step.line}\nexit {code}, output:\n{output}"
        assert daemon.returncode is None
    finally:
        await http.aclose()
        daemon.terminate()
        with anyio.move_on_after(30):
            await daemon.wait()
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
        await daemon.aclose()
        log.close()
    assert not (tmp_path / ".plugind" / "plugins").is_symlink()
    assert any((tmp_path / ".plugind" / "plugins" / "acme").iterdir())
