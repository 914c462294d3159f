"""``GET /health``: one bounded probe per dependency, folded into one verdict (docs/operations.md).

Every probe has its own short deadline, so a dead Postgres or a hung Redis turns into a 503
naming it within seconds instead of a request that hangs as long as the dependency does. Probes
are made afresh on every request (nothing cached), so the answer is 200 again as soon as the
dependency answers; they also report to the daemon's outage trackers (``plugind.outage``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import anyio
import asyncpg
import msgspec
from redis.asyncio import Redis

from plugind.bus.keys import Keys
from plugind.outage import Dependency, Outages, is_postgres_outage, is_redis_outage
from plugind.projections.lag import projector_lag
from plugind.projections.leader import lock_is_held, projector_lock_key
from plugind.projections.queries import EVENT_LOG_CHECKPOINT, get_checkpoint
from plugind.runtime.pool import PluginPool
from plugind.runtime.pool_report import pool_report

PROBE_TIMEOUT_S: Final = 2.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Probe:
    ok: bool
    latency_ms: float
    error: str | None = None
    value: Any = None
    exception: BaseException | None = None


@dataclass(frozen=True, slots=True)
class HealthReport:
    status: str  # healthy | degraded | unhealthy
    timestamp: str
    version: str
    components: dict[str, dict[str, Any] | None] = field(default_factory=dict)

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
    exception: BaseException | None = None
    try:
        with anyio.fail_after(timeout):
            value = await check()
    except TimeoutError as exc:
        error: str | None = f"no answer within {timeout:g}s"
        exception = exc
    except Exception as exc:  # a probe reports any failure rather than raising it
        error = _describe(exc)
        exception = exc
    else:
        error = None
    elapsed = round((time.perf_counter() - started) * 1000, 3)
    if error is not None:
        return Probe(False, elapsed, error, exception=exception)
    return Probe(True, elapsed, value=value)


def _report(
    result: Probe, state: Dependency | None, is_outage: Callable[[BaseException], bool]
) -> None:
    """Tell the outage tracker what a probe found (a timeout counts as an outage)."""
    if state is None:
        return
    if result.ok:
        state.ok()
    elif result.exception is not None and (
        isinstance(result.exception, TimeoutError) or is_outage(result.exception)
    ):
        state.failed(result.error or _describe(result.exception))


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
    outages: Outages | None = None,
    plugins: PluginPool | None = None,
) -> HealthReport:
    """Probe Redis, Postgres and the projector concurrently and fold them into one report.

    A dependency that is down is named with its error (and, when ``outages`` tracks it, how
    long it has been down). ``plugins`` is this process's plugin pool, shown as
    ``components.plugins``; ``None`` (shown as ``null``) when the process runs no worker, whose
    pool would always look empty. The pool does not change the verdict: a plugin that fails is
    its tasks' business, not the daemon's.
    """
    results: dict[str, Probe] = {}

    async def run(name: str, check: Callable[[], Awaitable[Any]]) -> None:
        results[name] = await probe(check, timeout)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "redis", redis.ping)
        tg.start_soon(run, "postgres", lambda: _postgres_state(pool, keys))
        tg.start_soon(run, "lag", lambda: projector_lag(redis, keys))

    _report(results["redis"], outages.redis if outages else None, is_redis_outage)
    _report(results["postgres"], outages.postgres if outages else None, is_postgres_outage)
    components: dict[str, dict[str, Any] | None] = {}
    for name in ("redis", "postgres"):
        result = results[name]
        component: dict[str, Any] = (
            {"status": "up", "latency_ms": result.latency_ms}
            if result.ok
            else {"status": "down", "error": result.error}
        )
        state = getattr(outages, name) if outages else None
        if not result.ok and state is not None and state.down_for is not None:
            component["down_for_s"] = round(state.down_for, 1)
        components[name] = component
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
    components["plugins"] = (
        msgspec.to_builtins(pool_report(plugins.snapshot())) if plugins is not None else None
    )

    if not (results["redis"].ok and pg.ok):
        status = "unhealthy"
    elif projector["status"] != "up":
        status = "degraded"
    else:
        status = "healthy"
    timestamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return HealthReport(status, timestamp, version, components)
