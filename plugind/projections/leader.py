"""Which node projects: one per namespace, elected by a Postgres advisory lock.

The lock is session-level, held on one pooled connection for as long as the node leads, and the
projector commits its batches on that same connection: a commit that succeeds proves the lock
was still ours, and a session that dies (Postgres restarted, connection killed) takes the lock
with it, so a standby can take over without anyone having to notice the death first.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Final

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from plugind.bus.keys import Keys
from plugind.projections._db import Executor, advisory_key

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S: Final = 5.0


def projector_lock_key(keys: Keys) -> int:
    return advisory_key(f"plugind:projector:{keys.namespace}")


def _advisory_parts(key: int) -> tuple[int, int]:
    """``(classid, objid)``, how ``pg_locks`` shows a bigint advisory key."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


async def lock_is_held(conn: Executor, key: int) -> bool:
    """Whether any session of this database holds the advisory lock ``key`` (a leader exists)."""
    classid, objid = _advisory_parts(key)
    held = await conn.fetchval(
        """
        SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                       WHERE l.locktype = 'advisory' AND l.granted
                         AND d.datname = current_database()
                         AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 1)
        """,
        classid,
        objid,
    )
    return bool(held)


class LeaderLock:
    """The advisory lock ``key``, held on a connection of ``pool`` while we lead."""

    def __init__(self, pool: asyncpg.Pool, key: int, *, acquire_timeout: float = 10.0) -> None:
        self._pool = pool
        self._key = key
        self._acquire_timeout = acquire_timeout
        self._conn: PoolConnectionProxy | None = None

    @property
    def held(self) -> bool:
        return self._conn is not None

    @property
    def connection(self) -> PoolConnectionProxy:
        """The lock's connection: work done on it is done by the leader, or fails."""
        if self._conn is None:
            raise RuntimeError("not the leader: the lock is not held")
        return self._conn

    async def try_acquire(self) -> bool:
        """Take the lock if it is free; returns whether we hold it. Never waits for a holder."""
        if self._conn is not None:
            return True
        conn = await self._pool.acquire(timeout=self._acquire_timeout)
        try:
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._key)
        except BaseException:
            self._discard(conn)
            raise
        if not got:
            await self._give_back(conn)
            return False
        self._conn = conn
        return True

    async def release(self) -> None:
        """Give up the lock; safe to call when not held, and never raises on a dead connection.

        When Postgres went away the connection may already be closed, or detached from its
        proxy by asyncpg (every call on it then raises ``InterfaceError``): either way the
        session, and the lock with it, is gone, and all that is left is to drop the connection.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            return
        unlocked = False
        with anyio.move_on_after(RELEASE_TIMEOUT_S):
            try:
                await conn.execute("SELECT pg_advisory_unlock($1)", self._key)
                unlocked = True
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                log.debug("Unlocking the projector lock failed (%r): dropping its session", exc)
        if unlocked:
            await self._give_back(conn)
        else:
            self._discard(conn)

    async def _give_back(self, conn: PoolConnectionProxy) -> None:
        try:
            await self._pool.release(conn, timeout=RELEASE_TIMEOUT_S)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            self._discard(conn)

    def _discard(self, conn: PoolConnectionProxy) -> None:
        """Close ``conn`` rather than return it: its session is dead or in an unknown state."""
        # Terminating detaches the proxy and hands its slot back to the pool, which opens a new
        # connection when next asked; a proxy asyncpg already detached is back in the pool.
        with contextlib.suppress(asyncpg.InterfaceError):
            conn.terminate()
