"""Stream trimming never drops what a group or the projector still needs."""

from __future__ import annotations

from typing import Any

import pytest

from plugind.bus.groups import ensure_group
from plugind.bus.keys import WORKERS_GROUP, Keys
from plugind.bus.retention import trim_stream

pytestmark = pytest.mark.anyio


async def _ids(redis: Any, stream: str) -> list[str]:
    return [i.decode() for i, _f in await redis.xrange(stream)]


async def test_trims_only_below_the_oldest_pending_and_undelivered(redis: Any, keys: Keys) -> None:
    await ensure_group(redis, keys.tasks, WORKERS_GROUP)
    ids = [(await redis.xadd(keys.tasks, {"cmd": str(i)})).decode() for i in range(6)]
    # entries 0-3 delivered; 0, 1 and 3 acknowledged; 2 still pending; 4 and 5 not yet delivered
    await redis.xreadgroup(WORKERS_GROUP, "c", {keys.tasks: ">"}, count=4)
    await redis.xack(keys.tasks, WORKERS_GROUP, ids[0], ids[1], ids[3])

    assert await trim_stream(redis, keys.tasks, retention_s=0) == 2
    assert await _ids(redis, keys.tasks) == ids[2:]

    await redis.xack(keys.tasks, WORKERS_GROUP, ids[2])
    await trim_stream(redis, keys.tasks, retention_s=0)
    assert await _ids(redis, keys.tasks) == ids[4:]  # never past what was not delivered


async def test_the_retention_window_and_the_ceiling_hold_entries_back(
    redis: Any, keys: Keys
) -> None:
    await ensure_group(redis, keys.events, "projector")
    ids = [(await redis.xadd(keys.events, {"event": str(i)})).decode() for i in range(4)]
    await redis.xreadgroup("projector", "p", {keys.events: ">"}, count=4)
    await redis.xack(keys.events, "projector", *ids)

    assert await trim_stream(redis, keys.events, retention_s=3600) == 0
    assert await trim_stream(redis, keys.events, retention_s=0, ceiling=ids[2]) == 2
    assert await _ids(redis, keys.events) == ids[2:]


async def test_a_stream_without_groups_is_left_alone(redis: Any, keys: Keys) -> None:
    await redis.xadd(keys.dead, {"x": "1"})
    assert await trim_stream(redis, keys.dead, retention_s=0) == 0
    assert await trim_stream(redis, keys.install, retention_s=0) == 0  # absent
