"""``GET /health``: one bounded probe per dependency, folded into one verdict (DESIGN §8).

Every probe has its own short deadline, so a dead Postgres or a hung Redis turns into a 503
naming it within seconds instead of a request that hangs as long as the dependency does.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import anyio
import asyncpg
from redis.asyncio import Redis

from plugind.bus.keys import Keys
from plugind.projections.lag import projector_lag
from plugind.projections.leader import lock_is_held, projector_lock_key
from plugind.projections.queries import EVENT_LOG_CHECKPOINT, get_checkpoint

PROBE_TIMEOUT_S: Final = 2.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Probe:
    ok: bool
    latency_ms: float
    error: str | None = None
    value: Any = None


@dataclass(frozen=True, slots=True)
class HealthReport:
    status: str  # healthy | degraded | unhealthy
    timestamp: str
    version: str
    components: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def http_status(self) -> int:
        return 200 if self.status == "healthy" else 503

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "timestamp": self.timestamp,
            "version": self.version,
            "components": self.components,
        }


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def probe(check: Callable[[], Awaitable[T]], timeout: float = PROBE_TIMEOUT_S) -> Probe:
    """Run ``check`` under a deadline; any failure becomes a ``Probe`` with its error."""
    started = time.perf_counter()
    try:
        with anyio.fail_after(timeout):
            value = await check()
    except TimeoutError:
        error: str | None = f"no answer within {timeout:g}s"
    except Exception as exc:  # a probe reports any failure rather than raising it
        error = _describe(exc)
    else:
        error = None
    elapsed = round((time.perf_counter() - started) * 1000, 3)
    if error is not None:
        return Probe(False, elapsed, error)
    return Probe(True, elapsed, value=value)


async def _postgres_state(pool: asyncpg.Pool, keys: Keys) -> dict[str, Any]:
    async with pool.acquire(timeout=PROBE_TIMEOUT_S) as conn:
        try:
            checkpoint = await get_checkpoint(conn, EVENT_LOG_CHECKPOINT)
        except asyncpg.UndefinedTableError:
            return {"position": None, "active": False, "migrated": False}
        active = await lock_is_held(conn, projector_lock_key(keys))
    return {"position": checkpoint.last_position if checkpoint else None, "active": active}


async def check_health(
    *,
    redis: Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    version: str,
    lag_threshold: int,
    timeout: float = PROBE_TIMEOUT_S,
) -> HealthReport:
    """Probe Redis, Postgres and the projector concurrently and fold them into one report."""
    results: dict[str, Probe] = {}

    async def run(name: str, check: Callable[[], Awaitable[Any]]) -> None:
        results[name] = await probe(check, timeout)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "redis", redis.ping)
        tg.start_soon(run, "postgres", lambda: _postgres_state(pool, keys))
        tg.start_soon(run, "lag", lambda: projector_lag(redis, keys))

    components: dict[str, dict[str, Any]] = {}
    for name in ("redis", "postgres"):
        result = results[name]
        components[name] = (
            {"status": "up", "latency_ms": result.latency_ms}
            if result.ok
            else {"status": "down", "error": result.error}
        )
    lag, pg = results["lag"], results["postgres"]
    projector: dict[str, Any] = {"lag": lag.value if lag.ok else None}
    if pg.ok:
        projector.update(pg.value)
    if not lag.ok:
        projector.update(status="unknown", error=lag.error)
    elif lag.value > lag_threshold:
        projector.update(status="lagging", threshold=lag_threshold)
    else:
        projector["status"] = "up"
    components["projector"] = projector

    if not (results["redis"].ok and pg.ok):
        status = "unhealthy"
    elif projector["status"] != "up":
        status = "degraded"
    else:
        status = "healthy"
    timestamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return HealthReport(status, timestamp, version, components)
