"""Shared set-up of the end-to-end tests: a whole daemon in-process on real services."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from plugind.client import Client
from plugind.config import Settings
from plugind.projections._db import connect

if TYPE_CHECKING:
    from plugind.daemon import Daemon

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CALC = REPO / "examples" / "plugins" / "calc"


@pytest.fixture(scope="session")
def shared_plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PLUGIN_DIR for the session: plugins are keyed by checksum, so tests can share builds."""
    return tmp_path_factory.mktemp("plugins")


@pytest.fixture
def settings(
    redis_url: str, database_url: str, namespace: str, shared_plugin_dir: Path
) -> Settings:
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        namespace=namespace,
        plugin_dir=shared_plugin_dir,
        http_port=0,
        gateway_port=0,
        http_host="127.0.0.1",
        api_key="test-key",
        task_timeout=30.0,
        install_timeout=300.0,
        node=f"node-{namespace}",
    )


@pytest.fixture
async def daemon(settings: Settings, redis: Any) -> AsyncIterator[Daemon]:
    # ``redis`` first, so its clean-up of the namespace runs after the daemon has stopped
    from plugind.daemon import running_daemon

    async with running_daemon(settings, shutdown_grace_s=5) as d:
        yield d


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[Client]:
    assert daemon.redis is not None
    yield Client(daemon.redis, daemon.keys)


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)


async def eventually(
    db_url: str, sql: str, *args: Any, timeout: float = 20.0, expect: Any = None
) -> Any:
    """Poll ``sql`` until it returns a row (or ``expect``): the projector is asynchronous."""
    deadline = time.monotonic() + timeout
    conn = await connect(db_url)
    try:
        while True:
            row = await conn.fetchrow(sql, *args)
            if row is not None and (expect is None or row[0] == expect):
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {sql!r} {args}: last {row}")
            await anyio.sleep(0.05)
    finally:
        await conn.close()


async def run_cli(settings: Settings, *args: str, check: bool = True) -> tuple[int, str, str]:
    env = dict(
        os.environ,
        REDIS_URL=settings.redis_url or "",
        DATABASE_URL=settings.database_url or "",
        PLUGIND_NAMESPACE=settings.namespace,
    )
    result = await anyio.run_process(
        [sys.executable, "-m", "plugind.cli", *args], env=env, check=False
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    if check:
        assert result.returncode == 0, (args, out, err)
    return result.returncode, out, err
