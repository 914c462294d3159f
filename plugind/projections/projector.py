"""The projector: folds ``{ns}:events`` into Postgres, one transaction per batch.

A loop over three parts that can each be read and tested alone: leadership (``leader``: one
projector per namespace, by advisory lock), reading (``batch_reader``: the ``projector`` group,
pending entries first) and committing (``commit``: log, read models and checkpoint in one
transaction). Each batch is acknowledged only after its commit, and commits are idempotent by
the checkpoint, so whatever fails between read and ack, reading the batch again is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import anyio
import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from plugind.bus.keys import Keys
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
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self.node = node
        self.standby_interval = standby_interval
        self.checkpoint = checkpoint
        self.leader = LeaderLock(pool, projector_lock_key(keys))
        self.reader = BatchReader(redis, keys, node, batch_size=batch_size, block_ms=block_ms)
        self._isolate = False

    @property
    def active(self) -> bool:
        """True while this projector holds the namespace's lock."""
        return self.leader.held

    async def try_activate(self) -> bool:
        """Take the namespace's projector lock if it is free; returns whether we hold it."""
        if self.leader.held:
            return True
        if not await self.leader.try_acquire():
            return False
        try:
            await self.reader.take_over()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.leader.release()
            raise
        log.info("Projector active for namespace %s (node %s)", self.keys.namespace, self.node)
        return True

    async def deactivate(self) -> None:
        """Give up the lock (a standby takes over); safe to call when not active."""
        await self.leader.release()

    close = deactivate

    async def run(self) -> None:
        """Project until cancelled: standby until the lock is ours, then batch after batch."""
        backoff = 0.5
        waiting_logged = False
        try:
            while True:
                try:
                    if not self.active:
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
                    await self.run_once()
                    backoff = 0.5
                except ProjectionConflictError:
                    raise
                except Exception as exc:  # keep projecting: the daemon must outlive one bad batch
                    expected = (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
                    log.error(
                        "Projector batch failed, retrying in %.1fs: %r",
                        backoff,
                        exc,
                        exc_info=not isinstance(exc, expected),
                    )
                    self.reader.reread()
                    if isinstance(exc, asyncpg.PostgresError):
                        self._isolate = True
                    if self.leader.held and self.leader.connection.is_closed():
                        await self.deactivate()
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            with anyio.move_on_after(5, shield=True):
                await self.deactivate()

    async def run_once(self) -> int:
        """Read and commit at most one batch; returns how many events were appended to the log.

        Returns 0 without reading when another projector holds the lock.
        """
        if not await self.try_activate():
            return 0
        batch = await self.reader.read()
        if not batch:
            return 0
        # A batch read is committed and acknowledged even when shutdown cancels us meanwhile:
        # cancelling inside the transaction would only throw the work away (and make asyncpg
        # reset the connection). The bound keeps a wedged database from holding up shutdown.
        with anyio.CancelScope(shield=True), anyio.move_on_after(COMMIT_TIMEOUT_S):
            applied = await self.commit(batch)
            await self.reader.ack(batch)
            return applied
        return 0

    async def commit(self, batch: Sequence[LogEntry]) -> int:
        """Commit ``batch`` on the lock's connection, without acknowledging it."""
        applied = await commit_batch(
            self.leader.connection,
            batch,
            keys=self.keys,
            checkpoint=self.checkpoint,
            isolate=self._isolate,
        )
        self._isolate = False
        return applied

    async def lag(self) -> int:
        return await projector_lag(self.redis, self.keys)
