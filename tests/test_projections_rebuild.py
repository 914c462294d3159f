"""Rebuilding the read models from ``event_log``, the rebuild audit, and the CLI commands over
them, on real Redis and Postgres with a history projected by the real projector."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import anyio
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from test_projections_replay import (
    History,
    live_state,
    project_history,
    publish,
    started,
)

from plugind.bus.keys import Keys
from plugind.cli.ops import cmd_audit
from plugind.cli.projections import cmd_rebuild, cmd_replay
from plugind.config import Settings
from plugind.errors import CliError
from plugind.projections.projector import Projector
from plugind.projections.queries import get_task
from plugind.projections.rebuild import read_models_equal_rebuild, rebuild_read_models

pytestmark = pytest.mark.anyio


@pytest.fixture
async def history(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, projector: Projector
) -> History:
    return await project_history(redis, pool, keys, projector)


async def test_rebuild_reproduces_the_live_read_models(
    pool: asyncpg.Pool, history: History
) -> None:
    calls: list[tuple[int, int]] = []
    async with pool.acquire() as conn:
        before = await live_state(conn)
        assert (await read_models_equal_rebuild(conn)).ok
        result = await rebuild_read_models(conn, progress=lambda *a: calls.append(a), batch_size=4)
        assert await live_state(conn) == before
        diff = await read_models_equal_rebuild(conn, batch_size=3)
    assert (result.events, result.head_position, result.skipped) == (history.head, history.head, 0)
    assert (result.plugins, result.tasks) == (len(before[0]), len(before[1])) == (2, 5)
    assert result.duration_s > 0
    assert calls[0] == (0, history.head) and calls[-1] == (history.head, history.head)
    assert [done for done, _ in calls] == sorted({0, *range(4, history.head, 4), history.head})
    assert diff.ok and diff.to_dict()["ok"] is True
    assert (diff.events, diff.head_position) == (history.head, history.head)


async def test_a_tampered_read_model_is_detected_and_fixed_by_a_rebuild(
    pool: asyncpg.Pool, history: History
) -> None:
    async with pool.acquire() as conn:
        before = await live_state(conn)
        await conn.execute(
            "UPDATE tasks SET status = 'succeeded', error = NULL WHERE request_id = 'r2'"
        )
        await conn.execute("DELETE FROM tasks WHERE request_id = 'r5'")
        await conn.execute(
            "INSERT INTO tasks (request_id, tenant_id, status, created_at)"
            " VALUES ('forged', 't1', 'succeeded', now())"
        )
        await conn.execute("UPDATE plugins SET manifest = '{}' WHERE plugin_id = 'acme/calc'")

        diff = await read_models_equal_rebuild(conn)
        assert not diff.ok
        assert (diff.plugins_differing, diff.tasks_differing) == (1, 3)
        assert [(e.key, e.kind) for e in diff.plugins] == [(("t1", "acme/calc"), "changed")]
        assert [(e.key, e.kind) for e in diff.tasks] == [
            (("forged",), "unexpected"),
            (("r2",), "changed"),
            (("r5",), "missing"),
        ]
        limited = await read_models_equal_rebuild(conn, limit=1)
        assert (len(limited.tasks), limited.tasks_differing) == (1, 3)

        await rebuild_read_models(conn)
        assert await live_state(conn) == before
        assert (await read_models_equal_rebuild(conn)).ok
    r2 = await get_task(pool, "r2")
    assert r2 is not None and (r2.status, r2.error["code"]) == ("failed", "plugin_error")


async def test_rebuild_waits_for_an_in_flight_batch(pool: asyncpg.Pool, history: History) -> None:
    # A projector batch locks its checkpoint row first and writes the read models later; the
    # rebuild must queue behind it in that same order, or the two would deadlock.
    async with pool.acquire() as batch, pool.acquire() as conn:
        transaction = batch.transaction()
        await transaction.start()
        await batch.execute("SELECT 1 FROM projection_checkpoints FOR UPDATE")
        done = anyio.Event()

        async def rebuild() -> None:
            await rebuild_read_models(conn)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(rebuild)
            await anyio.sleep(0.3)
            assert not done.is_set()
            with anyio.fail_after(2):  # the tables are not locked yet: the batch goes on
                await batch.execute("UPDATE tasks SET attempts = 7 WHERE request_id = 'r5'")
            await transaction.commit()
            with anyio.fail_after(5):
                await done.wait()
    r5 = await get_task(pool, "r5")
    assert r5 is not None and r5.attempts == 1  # rebuilt after the batch, from the log


async def test_the_projector_waits_for_a_rebuild(
    redis: aioredis.Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    projector: Projector,
    history: History,
) -> None:
    await publish(redis, keys, [started("r9")])
    projected = anyio.Event()

    async def project() -> None:
        assert await projector.run_once() == 1
        projected.set()

    async with pool.acquire() as conn, anyio.create_task_group() as tg:
        outer = conn.transaction()  # holds the rebuild's locks until we commit
        await outer.start()
        await rebuild_read_models(conn)
        tg.start_soon(project)
        await anyio.sleep(0.3)
        assert not projected.is_set()
        await outer.commit()
        with anyio.fail_after(5):
            await projected.wait()
    r9 = await get_task(pool, "r9")
    assert r9 is not None and r9.status == "running"
    async with pool.acquire() as conn:
        assert (await read_models_equal_rebuild(conn)).ok


async def test_a_change_the_projector_skipped_is_skipped_by_the_rebuild(
    redis: aioredis.Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    projector: Projector,
    history: History,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # attempts does not fit the integer column: the live projector logs and skips that change
    await publish(redis, keys, [started("big", attempt=2**40), started("r8")])
    with caplog.at_level(logging.ERROR):
        async with anyio.create_task_group() as tg:
            tg.start_soon(projector.run)
            with anyio.fail_after(5):
                while await get_task(pool, "r8") is None:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        async with pool.acquire() as conn:
            assert (await read_models_equal_rebuild(conn)).ok
            result = await rebuild_read_models(conn, batch_size=100)
    assert (result.skipped, result.events) == (1, history.head + 2)
    assert await get_task(pool, "big") is None
    assert await get_task(pool, "r8") is not None
    assert any("position" in r.getMessage() for r in caplog.records if "replay" in r.name)


def cli_args(redis_url: str, database_url: str, namespace: str, **kw: Any) -> argparse.Namespace:
    settings = Settings(redis_url=redis_url, database_url=database_url, namespace=namespace)
    return argparse.Namespace(settings=settings, **kw)


async def test_cli_replay_rebuild_and_audit(
    redis_url: str,
    database_url: str,
    namespace: str,
    pool: asyncpg.Pool,
    history: History,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def args(**kw: Any) -> argparse.Namespace:
        return cli_args(redis_url, database_url, namespace, **kw)

    assert await cmd_replay(args(until=str(history.mid_position), json=True)) == 0
    state = orjson.loads(capsys.readouterr().out)
    assert state["position"] == history.mid_position
    assert [(p["plugin_id"], p["version"]) for p in state["plugins"]["t1"]] == [
        ("acme/calc", "0.1.0")
    ]
    assert state["task_counts"] == {"failed": 1, "running": 1, "succeeded": 1}

    assert await cmd_replay(args(until=None, json=False)) == 0
    out = capsys.readouterr().out
    assert f"State at position {history.head}" in out
    assert "tenant t2:" in out and "uninstalled" in out
    assert "tasks: 5 (failed 1, rejected 1, running 1, succeeded 1, timed_out 1)" in out
    time = history.mid_time.isoformat().replace("+00:00", "Z")
    assert await cmd_replay(args(until=time, json=False)) == 0
    assert "tasks: 3 (failed 1, running 1, succeeded 1)" in capsys.readouterr().out
    with pytest.raises(CliError) as bad:
        await cmd_replay(args(until="yesterday", json=False))
    assert bad.value.exit_code == 2

    assert await cmd_rebuild(args(json=False)) == 0
    out = capsys.readouterr().out  # piped: no progress bar, one line
    assert out.startswith(f"Rebuilt the read models from {history.head} logged event(s)")
    assert "2 plugin row(s), 5 task row(s)" in out and len(out.splitlines()) == 1
    assert await cmd_rebuild(args(json=True)) == 0
    assert orjson.loads(capsys.readouterr().out)["tasks"] == 5

    assert await cmd_audit(args(check="verify")) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["ok"] and report["hash_chain"]["ok"] and report["read_models"]["ok"]
    assert report["hash_chain"]["checked"] == history.head

    await pool.execute("UPDATE tasks SET status = 'succeeded' WHERE request_id = 'r3'")
    assert await cmd_audit(args(check="verify")) == 1
    captured = capsys.readouterr()
    report = orjson.loads(captured.out)
    assert report["ok"] is False and report["hash_chain"]["ok"] is True
    assert report["read_models"]["tasks"] == [{"table": "tasks", "key": ["r3"], "kind": "changed"}]
    assert "read models differ" in captured.err and "r3" in captured.err


async def test_cli_reports_an_unmigrated_database(
    redis_url: str, database_url: str, namespace: str
) -> None:
    args = cli_args(redis_url, database_url, namespace, json=False)
    with pytest.raises(CliError, match="plugind migrate"):
        await cmd_rebuild(args)
