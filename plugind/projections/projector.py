"""The projector: folds ``{ns}:events`` into Postgres, one transaction per batch.

A loop over three parts that can each be read and tested alone: leadership (``leader``: one
projector per namespace, by advisory lock), reading (``batch_reader``: the ``projector`` group,
pending entries first) and committing (``commit``: log, read models and checkpoint in one
transaction). Each batch is acknowledged only after its commit, and commits are idempotent by
the checkpoint, so whatever fails between read and ack, reading the batch again is harmless.

The loop outlives its dependencies: when Postgres or Redis goes away it gives up leadership
(the lock died with the session anyway), retries with capped backoff, logs the outage once when
it starts and once when it is over, and resumes from the checkpoint as leader or standby.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Final

import anyio
import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from plugind.bus.keys import Keys
from plugind.metrics import NodeMetrics
from plugind.projections._db import postgres_unreachable
from plugind.projections._entries import LogEntry
from plugind.projections.batch_reader import BatchReader
from plugind.projections.commit import ProjectionConflictError, commit_batch
from plugind.projections.lag import projector_lag
from plugind.projections.leader import LeaderLock, projector_lock_key
from plugind.projections.queries import EVENT_LOG_CHECKPOINT

__all__ = [
    "EVENT_LOG_CHECKPOINT",
    "ProjectionConflictError",
    "Projector",
    "projector_lock_key",
]

log = logging.getLogger(__name__)

COMMIT_TIMEOUT_S: Final = 30.0
LINGER_S: Final = 0.01
FIRST_RETRY_S: Final = 0.5
OUTAGE_RETRY_CAP_S: Final = 5.0
FAILURE_RETRY_CAP_S: Final = 30.0
POSTGRES: Final = "Postgres"
REDIS: Final = "Redis"


def _unreachable(exc: BaseException) -> str | None:
    """The dependency ``exc`` says is unreachable, or None if it is some other failure."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return REDIS
    if postgres_unreachable(exc):
        return POSTGRES
    return None


class _Outage:
    """One warning line when a dependency stops answering, one info line when it is back.

    Retries in between stay at debug level: an operator needs when and how long, not every try.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._since: float | None = None

    def begin(self, exc: BaseException, retry_in: float) -> None:
        if self._since is not None:
            log.debug("%s still unreachable (%r); retrying in %.1fs", self.name, exc, retry_in)
            return
        self._since = anyio.current_time()
        log.warning(
            "Projector lost %s (%r); it gives up leadership and retries with backoff",
            self.name,
            exc,
        )

    def end(self) -> None:
        if self._since is not None:
            log.info(
                "Projector: %s reachable again after %.1fs",
                self.name,
                anyio.current_time() - self._since,
            )
            self._since = None


class Projector:
    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool,
        keys: Keys,
        node: str,
        *,
        batch_size: int = 500,
        block_ms: int = 1000,
        standby_interval: float = 2.0,
        checkpoint: str = EVENT_LOG_CHECKPOINT,
        metrics: NodeMetrics | None = None,
        linger_s: float = LINGER_S,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self.node = node
        self.standby_interval = standby_interval
        self.checkpoint = checkpoint
        self.leader = LeaderLock(pool, projector_lock_key(keys))
        self.reader = BatchReader(redis, keys, node, batch_size=batch_size, block_ms=block_ms)
        self.linger_s = linger_s
        self._ahead: list[LogEntry] | None = None  # the next batch, read while one committed
        self._last_read = 0.0
        self._isolate = False
        self._metrics = metrics
        self._outages = {name: _Outage(name) for name in (POSTGRES, REDIS)}

    @property
    def active(self) -> bool:
        """True while this projector holds the namespace's lock."""
        return self.leader.held

    async def try_activate(self) -> bool:
        """Take the namespace's projector lock if it is free; returns whether we hold it."""
        if self.leader.held:
            return True
        acquired = await self.leader.try_acquire()
        self._outages[POSTGRES].end()
        if not acquired:
            return False
        self._ahead = None  # read under an earlier leadership: pending entries come first now
        try:
            await self.reader.take_over()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.leader.release()
            raise
        self._outages[REDIS].end()
        log.info("Projector active for namespace %s (node %s)", self.keys.namespace, self.node)
        return True

    async def deactivate(self) -> None:
        """Give up the lock (a standby takes over); safe to call when not active."""
        self._ahead = None
        await self.leader.release()

    close = deactivate

    async def run(self) -> None:
        """Project until cancelled: standby until the lock is ours, then batch after batch.

        Only :class:`ProjectionConflictError` (a configuration error) ends it.
        """
        delay = FIRST_RETRY_S
        waiting_logged = False
        try:
            while True:
                try:
                    if not await self.try_activate():
                        if not waiting_logged:
                            log.info(
                                "Projector standby for namespace %s: another one is active",
                                self.keys.namespace,
                            )
                            waiting_logged = True
                        await anyio.sleep(self.standby_interval)
                        continue
                    waiting_logged = False
                    await self._step()
                    delay = FIRST_RETRY_S
                except ProjectionConflictError:
                    raise
                except Exception as exc:  # keep projecting: the daemon must outlive any batch
                    delay = await self._recover(exc, delay)
        finally:
            with anyio.move_on_after(5, shield=True):
                await self.deactivate()

    async def _step(self) -> None:
        """One batch of :meth:`run`: like :meth:`run_once`, with two differences for throughput.

        Behind (a full batch, our own pending entries already read), the next batch is read
        and decoded while this one commits, so decoding and Postgres work overlap. Caught up (a
        smaller batch), the next read waits until ``linger_s`` after the last one, so a steady
        stream of events is committed in batches of a few dozen rather than one or two at a
        time: a commit costs about as much for one event as for fifty. Projection lags by at
        most that much more; the terminal events on the stream, which clients wait for, do not.
        """
        batch, self._ahead = self._ahead, None
        if batch is None:
            wait = self._last_read + self.linger_s - anyio.current_time()
            if wait > 0:
                await anyio.sleep(wait)
            self._last_read = anyio.current_time()
            batch = await self.reader.read()
        if not batch:
            return
        behind = len(batch) >= self.reader.batch_size and not self.reader.pending_first
        failure: Exception | None = None
        read_failure: list[Exception] = []
        async with anyio.create_task_group() as tg:
            if behind:
                tg.start_soon(self._read_ahead, read_failure)
            try:
                await self._commit_and_ack(batch)
            except Exception as exc:
                failure = exc
                tg.cancel_scope.cancel()
        if failure is not None:
            self._ahead = None
            raise failure
        if read_failure:
            raise read_failure[0]

    async def _read_ahead(self, failure: list[Exception]) -> None:
        try:
            self._ahead = await self.reader.read()
        except Exception as exc:
            failure.append(exc)

    async def _recover(self, exc: Exception, delay: float) -> float:
        """Handle a failed step, wait, and return the next wait."""
        self._ahead = None
        self.reader.reread()  # the failed batch (if any) is read again, and skipped if committed
        dependency = _unreachable(exc)
        if dependency is not None:
            self._outages[dependency].begin(exc, delay)
            await self.deactivate()  # re-elected once it is back, as leader or standby
            cap = OUTAGE_RETRY_CAP_S
        else:
            log.error(
                "Projector batch failed, retrying in %.1fs: %r",
                delay,
                exc,
                exc_info=not isinstance(exc, RedisError | asyncpg.PostgresError),
            )
            # Retry with each read-model change isolated, so one poisonous event cannot wedge
            # the projector: it stays in the log, its change is skipped and reported.
            self._isolate = True
            cap = FAILURE_RETRY_CAP_S
        await anyio.sleep(delay)
        return min(delay * 2, cap)

    async def run_once(self) -> int:
        """Read and commit at most one batch; returns how many events were appended to the log.

        Returns 0 without reading when another projector holds the lock.
        """
        if not await self.try_activate():
            return 0
        batch = await self.reader.read()
        if not batch:
            return 0
        return await self._commit_and_ack(batch)

    async def _commit_and_ack(self, batch: Sequence[LogEntry]) -> int:
        # A batch read is committed and acknowledged even when shutdown cancels us meanwhile:
        # cancelling inside the transaction would only throw the work away (and make asyncpg
        # reset the connection). The bound keeps a wedged database from holding up shutdown,
        # and counts as Postgres being unreachable.
        with anyio.CancelScope(shield=True), anyio.fail_after(COMMIT_TIMEOUT_S):
            applied = await self.commit(batch)
            await self.reader.ack(batch)
        return applied

    async def commit(self, batch: Sequence[LogEntry]) -> int:
        """Commit ``batch`` on the lock's connection, without acknowledging it."""
        started = time.perf_counter()
        applied = await commit_batch(
            self.leader.connection,
            batch,
            keys=self.keys,
            checkpoint=self.checkpoint,
            isolate=self._isolate,
        )
        self._isolate = False
        if self._metrics is not None:
            self._metrics.projector_commit.observe(time.perf_counter() - started)
            self._metrics.projector_events.inc(applied)
        return applied

    async def lag(self) -> int:
        return await projector_lag(self.redis, self.keys)
