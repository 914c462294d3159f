"""The consumer-group loop: read commands, run handlers with bounded concurrency, stop gracefully.

A consumer reads only as many entries as it has free slots, so nothing sits claimed-but-idle in
its pending list while other nodes have capacity. Entries it owns are kept alive (their idle time
reset with ``XCLAIM … JUSTID``, which does not count as a delivery) so the reclaimer of another
node never steals work that is merely slow.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from plugind.bus.codec import read_entries, text
from plugind.bus.delivery import Delivery
from plugind.bus.groups import ensure_group
from plugind.bus.reclaim import reclaim_once

log = logging.getLogger(__name__)

Handler = Callable[[Delivery], Awaitable[None]]

KEEPALIVE_INTERVAL_S = 10.0


class StreamConsumer:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        stream: str,
        group: str,
        consumer: str,
        handler: Handler,
        concurrency: int,
        block_ms: int = 1000,
        reclaim_idle_s: float = 90.0,
        max_deliveries: int = 5,
        on_dead: Handler | None = None,
    ) -> None:
        self._redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self._handler = handler
        self.concurrency = concurrency
        self._block_ms = block_ms
        self._reclaim_idle_s = reclaim_idle_s
        self._max_deliveries = max_deliveries
        self._on_dead = on_dead
        self._in_flight: set[str] = set()
        self._slot_freed = anyio.Event()
        self._stopping = anyio.Event()
        self._read_scope: anyio.CancelScope | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def stop(self) -> None:
        """Stop reading new entries; in-flight ones finish (see :meth:`run`'s grace)."""
        self._stopping.set()
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def run(
        self,
        *,
        grace_s: float = 30.0,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        await ensure_group(self._redis, self.stream, self.group)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keepalive)
            tg.start_soon(self._reclaim_loop, tg)
            task_status.started()
            # First our own pending entries (a restart under the same consumer name), then new ones.
            await self._read_loop(tg, "0")
            if not self._stopping.is_set():
                await self._read_loop(tg, ">")
            with anyio.move_on_after(grace_s):
                while self._in_flight:
                    await self._wait_slot()
            if self._in_flight:
                log.warning(
                    "Shutdown grace of %.0fs over: %d %s entries left pending for another consumer",
                    grace_s,
                    len(self._in_flight),
                    self.stream,
                )
            tg.cancel_scope.cancel()

    async def _read_loop(self, tg: anyio.abc.TaskGroup, start: str) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            free = self.concurrency - len(self._in_flight)
            if free <= 0:
                await self._wait_slot()
                continue
            with anyio.CancelScope() as scope:
                self._read_scope = scope
                if self._stopping.is_set():
                    break
                try:
                    reply = await self._redis.xreadgroup(
                        self.group,
                        self.consumer,
                        {self.stream: start},
                        count=free,
                        block=None if start == "0" else self._block_ms,
                    )
                    backoff = 0.1
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                        raise
                    # someone deleted the stream or the group under us: recreate, carry on
                    log.warning("%s on %s; recreating the group", exc, self.stream)
                    await ensure_group(self._redis, self.stream, self.group)
                    continue
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    log.warning(
                        "Reading %s failed (%s); retrying in %.1fs", self.stream, exc, backoff
                    )
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            self._read_scope = None
            if scope.cancel_called:
                break
            entries = read_entries(reply)
            if start != ">" and not entries:
                return  # our backlog is drained
            counts: dict[str, int] = {}
            if start != ">":
                counts = await self._delivery_counts(entries)
                start = entries[-1][0]  # the backlog is read by id: move past what we have
            for entry_id, fields in entries:
                if not fields:  # trimmed while pending: nothing left to run
                    await self._redis.xack(self.stream, self.group, entry_id)
                    continue
                deliveries = counts.get(entry_id, 1)
                if deliveries > self._max_deliveries and self._on_dead is not None:
                    # our own backlog after a restart: an entry that keeps killing this node
                    # must reach the dead letters too, not run again for ever
                    self._in_flight.add(entry_id)
                    tg.start_soon(
                        self._run_dead, Delivery(self.stream, entry_id, fields, deliveries - 1)
                    )
                    continue
                self.dispatch(tg, Delivery(self.stream, entry_id, fields, deliveries))

    async def _delivery_counts(
        self, entries: list[tuple[str, dict[bytes, bytes]]]
    ) -> dict[str, int]:
        """How often each of our pending ``entries`` was delivered, this read included."""
        pending: list[dict[str, Any]] = await self._redis.xpending_range(
            self.stream,
            self.group,
            min=entries[0][0],
            max=entries[-1][0],
            count=len(entries),
            consumername=self.consumer,
        )
        return {text(p["message_id"]): int(p["times_delivered"]) for p in pending}

    def dispatch(self, tg: anyio.abc.TaskGroup, delivery: Delivery) -> None:
        """Run ``delivery`` in ``tg``, counting it against this consumer's slots."""
        self._in_flight.add(delivery.entry_id)
        tg.start_soon(self._run_one, delivery)

    async def _run_one(self, delivery: Delivery) -> None:
        try:
            await self._handler(delivery)
        except Exception:
            # The entry stays pending: another delivery (reclaim) retries it, and after
            # PLUGIND_MAX_DELIVERIES it is dead-lettered. The consumer itself goes on.
            log.exception("Handler failed on %s %s; left pending", self.stream, delivery.entry_id)
        finally:
            self._in_flight.discard(delivery.entry_id)
            self._slot_freed.set()

    async def _wait_slot(self) -> None:
        self._slot_freed = anyio.Event()
        with anyio.move_on_after(1.0):
            await self._slot_freed.wait()

    async def _keepalive(self) -> None:
        while True:
            await anyio.sleep(KEEPALIVE_INTERVAL_S)
            ids: list[Any] = list(self._in_flight)
            if not ids:
                continue
            try:
                await self._redis.xclaim(
                    self.stream, self.group, self.consumer, 0, ids, justid=True
                )
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("Keep-alive of %d %s entries failed: %s", len(ids), self.stream, exc)

    async def reclaim(self, tg: anyio.abc.TaskGroup) -> int:
        """Take over stale entries of other consumers once; returns how many were taken."""
        found = await reclaim_once(
            self._redis,
            stream=self.stream,
            group=self.group,
            consumer=self.consumer,
            in_flight=self._in_flight,
            min_idle_ms=int(self._reclaim_idle_s * 1000),
            max_deliveries=self._max_deliveries,
            limit=max(self.concurrency - len(self._in_flight), 0),
        )
        for delivery in found.run:
            log.info(
                "Reclaimed %s %s (delivery %d)", self.stream, delivery.entry_id, delivery.deliveries
            )
            self.dispatch(tg, delivery)
        for delivery in found.dead:
            if self._on_dead is not None:
                self._in_flight.add(delivery.entry_id)
                tg.start_soon(self._run_dead, delivery)
        return len(found.run) + len(found.dead)

    async def _run_dead(self, delivery: Delivery) -> None:
        assert self._on_dead is not None
        try:
            await self._on_dead(delivery)
        except Exception:
            log.exception("Dead-lettering %s %s failed", self.stream, delivery.entry_id)
        finally:
            self._in_flight.discard(delivery.entry_id)
            self._slot_freed.set()

    async def _reclaim_loop(self, tg: anyio.abc.TaskGroup) -> None:
        interval = min(max(self._reclaim_idle_s / 4, 0.2), 15.0)
        while not self._stopping.is_set():
            await anyio.sleep(interval)
            if self._stopping.is_set():
                return
            try:
                await self.reclaim(tg)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("Reclaiming on %s failed: %s", self.stream, exc)
