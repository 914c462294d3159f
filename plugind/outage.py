"""Dependency outages: one log line when Redis or Postgres goes away, one when it is back.

Every long-running role meets an outage on its own: a consumer's read, a handler's terminal
commit, the retention loop, a health probe. Were each to log every failed attempt, a ten-second
outage would bury the log under hundreds of identical lines and tracebacks. They all report to
one :class:`Dependency` per service instead, which logs the transitions only
(``Redis unreachable: <reason>; retrying`` / ``Redis reachable again after 12.3s``) and keeps the
count and total duration of outages that ``/metrics`` exports.

Roles retry with :class:`Backoff` (capped, so work resumes within about a second of the
dependency's return) and never end the process for an outage (docs/operations.md, "Outages").
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, TypeVar

import anyio
import asyncpg
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from plugind.errors import PlugindError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Postgres errors that mean "the server is gone or going", not "the query is wrong".
_POSTGRES_GONE: Final = (
    asyncpg.PostgresConnectionError,  # class 08: connection failure, connection does not exist
    asyncpg.exceptions.AdminShutdownError,  # 57P01: terminating connection (fast shutdown)
    asyncpg.exceptions.CrashShutdownError,  # 57P02: another backend crashed
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up, shutting down, recovering
    asyncpg.exceptions.TooManyConnectionsError,  # 53300: comes and goes like an outage
)


def describe(exc: BaseException) -> str:
    """``Type: message`` (or the type alone), one line: what a log line or an error names."""
    text = " ".join(str(exc).split()).rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_redis_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis cannot serve us right now (so the same command may work later).

    redis-py's connection and timeout errors (it wraps socket errors in them;
    ``BusyLoadingError``, a restarting Redis loading its data, is one), and the replies of a
    Redis that cannot take writes for the moment: a replica after a failover (``READONLY``), a
    master without its link (``MASTERDOWN``), a failed snapshot (``MISCONF``), a Redis Cluster
    whose slot is moving or has no master (``MOVED``, ``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``;
    the daemon re-points itself at the slot's new master, see ``bus.cluster``). ``NOSCRIPT`` is
    not here: whoever runs a script loads it again. Bare ``OSError`` is left to
    :func:`is_postgres_outage`, so code that talks to both can tell them apart.
    """
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return True
    if isinstance(exc, ReadOnlyError | MasterDownError):
        return True
    if isinstance(exc, AskError | TryAgainError | ClusterDownError):
        return True  # Redis Cluster: the slot is moving or has no master for a moment
    return isinstance(exc, ResponseError) and str(exc).startswith("MISCONF")


def is_postgres_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says Postgres is unreachable (rather than that a query was wrong)."""
    if isinstance(exc, (OSError, *_POSTGRES_GONE)):  # OSError includes TimeoutError
        return True
    # asyncpg reports a connection that died under us (or before we used it) this way
    return isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc)


class Dependency:
    """What this process knows about one dependency: up or down, since when, how often.

    Callers report every failure (:meth:`failed`) and success (:meth:`ok`) they see; only a
    change of state is logged. Cheap enough to call on every command.
    """

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._down_since: float | None = None
        self._finished_s = 0.0
        self.outages = 0
        self.reason: str | None = None

    @property
    def down(self) -> bool:
        return self._down_since is not None

    @property
    def down_for(self) -> float | None:
        """Seconds since the current outage began; None while the dependency is up."""
        return None if self._down_since is None else self._clock() - self._down_since

    @property
    def down_seconds(self) -> float:
        """Total seconds of every outage so far, the current one included."""
        return self._finished_s + (self.down_for or 0.0)

    def failed(self, error: BaseException | str) -> None:
        """Report a failure that means the dependency is unreachable."""
        reason = error if isinstance(error, str) else describe(error)
        if self._down_since is not None:
            return
        self._down_since = self._clock()
        self.outages += 1
        self.reason = reason
        log.warning("%s unreachable: %s; retrying", self.name, reason)

    def ok(self) -> None:
        """Report a success: ends the current outage, if any."""
        if self._down_since is None:
            return
        elapsed = self._clock() - self._down_since
        self._down_since = None
        self._finished_s += elapsed
        self.reason = None
        log.warning("%s reachable again after %.1fs", self.name, elapsed)


@dataclass(frozen=True, slots=True)
class Outages:
    """The trackers of one daemon (one per dependency), shared by all its roles."""

    redis: Dependency = field(default_factory=lambda: Dependency("Redis"))
    postgres: Dependency = field(default_factory=lambda: Dependency("Postgres"))

    def __iter__(self) -> Iterator[Dependency]:
        return iter((self.redis, self.postgres))


class Backoff:
    """Capped exponential delays: ``first``, twice that, ... never more than ``cap``.

    The cap is short on purpose: while a dependency is down a retry costs little (a refused
    connection), and once it is back the work should resume within about ``cap`` seconds.
    """

    def __init__(self, first: float = 0.05, cap: float = 1.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first

    async def sleep(self) -> None:
        await anyio.sleep(self.next())


async def retry_redis(
    operation: Callable[[], Awaitable[T]],
    state: Dependency,
    *,
    backoff: Backoff | None = None,
) -> T:
    """``await operation()`` until it returns, riding out Redis outages; other errors raise.

    The first failure is retried at once: it is most often one stale pooled connection from
    before a Redis restart, and the retry gets a fresh one. Later failures report the outage to
    ``state`` and wait a capped backoff. Only idempotent operations (or ones whose repetition is
    harmless) may be retried like this: after a dropped connection nobody knows whether Redis ran
    the command. Cancellation (shutdown) ends the wait.
    """
    delay = backoff or Backoff()
    failures = 0
    while True:
        try:
            result = await operation()
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            failures += 1
            if failures == 1:
                log.debug("Redis command failed (%s); retrying at once", describe(exc))
                continue
            state.failed(exc)
            await delay.sleep()
            continue
        state.ok()
        return result


@contextlib.contextmanager
def needs_postgres(what: str, state: Dependency | None = None) -> Iterator[None]:
    """Turn a Postgres outage inside the block into ``PlugindError("database_unavailable")``.

    For the few things a worker cannot do without Postgres (storing or fetching a package): they
    end with a clear error in their terminal event instead of an entry left pending, while tasks
    of plugins the node already has keep running.
    """
    try:
        yield
    except Exception as exc:
        if not is_postgres_outage(exc):
            raise
        if state is not None:
            state.failed(exc)
        raise PlugindError(
            "database_unavailable",
            f"{what} needs Postgres, which is unreachable ({describe(exc)}); "
            "try again once it is back",
        ) from exc
