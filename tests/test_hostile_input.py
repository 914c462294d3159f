"""Whatever producers append, every entry ends with one terminal event and the daemon goes on."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugind.bus.codec import EVENT_FIELD
from plugind.bus.keys import WORKERS_GROUP
from plugind.client import Client
from plugind.config import Settings
from plugind.daemon import Daemon, running_daemon
from plugind.messages import TERMINAL_EVENT_TYPES, decode_event

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
command_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["task", "install", "uninstall", "nope", ""])},
    optional={
        "request_id": st.text(max_size=140) | st.integers(0, 2**32),
        "tenant_id": st.text(max_size=10) | st.none(),
        "plugin_id": st.text(max_size=20) | json_values,
        "access": st.text(max_size=8),
        "action": st.text(max_size=8),
        "payload": json_values,
        "package": st.fixed_dictionaries(
            {},
            optional={
                "path": st.text(max_size=30),
                "base64": st.text(max_size=30),
                "sha256": st.text(max_size=64),
            },
        ),
        "timeout_s": st.floats(allow_nan=False) | st.text(max_size=3),
        "stream": json_values,
    },
)
entries = st.lists(
    st.one_of(
        command_like.map(lambda c: {"cmd": orjson.dumps(c)}),
        st.binary(max_size=200).map(lambda b: {"cmd": b}),
        st.dictionaries(
            st.text(min_size=1, max_size=5), st.binary(max_size=20), min_size=1, max_size=3
        ),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=entries)
def test_random_entries_each_end_once(
    redis_url: str, admin_database_url: str, shared_plugin_dir: Path, batch: list[Any]
) -> None:
    # Sync on the outside (hypothesis drives it), one whole daemon per example inside.
    anyio.run(_each_entry_ends_once, redis_url, admin_database_url, shared_plugin_dir, batch)


async def _each_entry_ends_once(
    redis_url: str, admin_url: str, plugin_dir: Path, batch: list[Any]
) -> None:
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    dbname = namespace.replace("-", "_")
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    redis = aioredis.Redis.from_url(redis_url)
    settings = Settings(
        redis_url=redis_url,
        database_url=admin_url.rsplit("/", 1)[0] + "/" + dbname,
        namespace=namespace,
        plugin_dir=plugin_dir,
        http_port=0,
        http_host="127.0.0.1",
        node=f"node-{namespace}",
    )
    try:
        async with running_daemon(settings, roles=("worker",), shutdown_grace_s=5) as daemon:
            await _check(daemon, redis, batch)
    finally:
        async for key in redis.scan_iter(match="{" + namespace + "}*"):
            await redis.delete(key)
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


async def _check(daemon: Daemon, redis: Any, batch: list[Any]) -> None:
    keys = daemon.keys
    start = await redis.xrevrange(keys.events, count=1)
    cursor = start[0][0].decode() if start else "0-0"
    ids: list[str] = []
    for i, fields in enumerate(batch):
        stream = keys.tasks if i % 2 else keys.install
        ids.append((await redis.xadd(stream, fields)).decode())

    with anyio.fail_after(60):
        while True:
            pending, lag = 0, []
            for stream in keys.command_streams:
                pending += (await redis.xpending(stream, WORKERS_GROUP))["pending"]
                lag += [g.get("lag") for g in await redis.xinfo_groups(stream)]
            if pending == 0 and all(v == 0 for v in lag):
                break
            await anyio.sleep(0.05)

    ended: dict[tuple[str, str], int] = {}
    by_request: dict[str, int] = {}
    for _id, fields in await redis.xrange(keys.events, min=f"({cursor}"):
        event = decode_event(fields[EVENT_FIELD.encode()])
        tag = event.__struct_config__.tag
        if tag not in TERMINAL_EVENT_TYPES:
            continue
        entry = getattr(event, "entry_id", None)
        if entry is not None:  # ids repeat across streams: the pair names one entry
            where = (str(getattr(event, "stream", "")), str(entry))
            ended[where] = ended.get(where, 0) + 1
        if event.request_id:
            by_request[event.request_id] = by_request.get(event.request_id, 0) + 1
    assert all(n == 1 for n in by_request.values()), by_request  # never two for one request
    assert all(n == 1 for n in ended.values()), ended

    # and the daemon still works
    client = Client(redis, keys)
    rid = await client.invoke_tool("nobody/nothing", "p", "t", {})
    final = await client.wait(rid, timeout=30)
    assert final.__struct_config__.tag == "task.failed"
