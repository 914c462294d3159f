"""The consumer-group loop: read commands, run handlers with bounded concurrency, stop gracefully.

A consumer reads only as many entries as it has free slots, so nothing sits claimed-but-idle in
its pending list while other nodes have capacity. Entries it owns are kept alive (their idle time
reset with ``XCLAIM … JUSTID``, which does not count as a delivery) every ``keepalive_s``, so
an entry's idle time is how long its owner has been silent about it. Once that reaches
``takeover_after_s`` (six keep-alives missed by default: 30 s and 5 s) the owner is dead or
frozen, and another node takes the entry over, whatever the task's own timeout; a live node's
entries never get there, however long they run.
A busy consumer waits (20 ms at most) until a quarter of its slots is free before it reads
again: one read then fetches many entries, where reading as each handler finished cost a round
trip per entry.

A Redis outage never ends a consumer: reads, keep-alives and reclaims retry with a capped backoff
(so reading resumes within about a second of Redis's return) and report to the daemon's outage
tracker, which logs one line when Redis goes and one when it is back. Running handlers go on
meanwhile; their commits wait for Redis themselves (``bus.autopipeline``). After an outage the
consumer also takes back entries Redis delivered to it whose reply it never got.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from redis.exceptions import ResponseError

from plugind.bus.codec import read_entries, text
from plugind.bus.delivery import Delivery
from plugind.bus.groups import ensure_group
from plugind.bus.reclaim import Reclaimed, reclaim_once
from plugind.outage import (
    Backoff,
    Dependency,
    describe,
    is_postgres_outage,
    is_redis_outage,
    retry_redis,
)

log = logging.getLogger(__name__)

Handler = Callable[[Delivery], Awaitable[None]]

DEFAULT_TAKEOVER_AFTER_S = 30.0
KEEPALIVES_PER_TAKEOVER = 6
SCANS_PER_TAKEOVER = 12  # how often every node looks for abandoned entries
SWEEP_EVERY_S = 600.0  # how often a node looks for consumers of nodes long gone
GONE_AFTER_S = 3600.0
READ_LINGER_S = 0.02


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
        takeover_after_s: float = DEFAULT_TAKEOVER_AFTER_S,
        keepalive_s: float | None = None,
        max_deliveries: int = 5,
        on_dead: Handler | None = None,
        outage: Dependency | None = None,
    ) -> None:
        self._redis = redis
        self._outage = outage or Dependency("Redis")
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self._handler = handler
        self.concurrency = concurrency
        self._block_ms = block_ms
        self._takeover_after_s = takeover_after_s
        self._keepalive_s = keepalive_s or takeover_after_s / KEEPALIVES_PER_TAKEOVER
        if self._keepalive_s * 2 > takeover_after_s:
            raise ValueError("keepalive_s must be at most half of takeover_after_s")
        self.taken_over = 0  # entries this consumer took from other consumers
        self._next_sweep = 0.0
        self._max_deliveries = max_deliveries
        self._on_dead = on_dead
        self._in_flight: set[str] = set()
        self._read_at = max(1, concurrency // 4)
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
        await retry_redis(lambda: ensure_group(self._redis, self.stream, self.group), self._outage)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keepalive)
            tg.start_soon(self._reclaim_loop, tg)
            task_status.started()
            # First our own pending entries (a restart under the same consumer name), then new
            # ones; after an outage, whatever Redis delivered to us while we could not hear it.
            await self._read_loop(tg, "0")
            while not self._stopping.is_set():
                if await self._read_loop(tg, ">"):
                    await self._adopt_orphans(tg)
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

    async def _read_loop(self, tg: anyio.abc.TaskGroup, start: str) -> bool:
        """Read from ``start`` (``0``: our backlog, ``>``: new entries) and dispatch.

        The backlog is read until drained; new entries until stopped, or until the first read
        after an outage succeeded (then True, so the caller looks for orphans).
        """
        backoff = Backoff(0.1, 1.0)
        failed = False
        short_since: float | None = None  # since when a few slots, not enough to read, are free
        while not self._stopping.is_set():
            free = self.concurrency - len(self._in_flight)
            if free <= 0:
                await self._wait_slot()
                continue
            if self._in_flight and free < self._read_at:
                # Busy: read once a quarter of the slots is free (one read for several entries
                # instead of one per finished handler), or after READ_LINGER_S at the latest.
                now = anyio.current_time()
                short_since = now if short_since is None else short_since
                if now - short_since < READ_LINGER_S:
                    await self._wait_slot(short_since + READ_LINGER_S - now)
                    continue
            short_since = None
            batch: tuple[list[tuple[str, dict[bytes, bytes]]], dict[str, int]] | None = None
            with anyio.CancelScope() as scope:
                self._read_scope = scope
                if self._stopping.is_set():
                    break
                try:
                    batch = await self._read(start, free)
                except Exception as exc:
                    if not is_redis_outage(exc):
                        raise
                    failed = True
                    self._outage.failed(exc)
                    await backoff.sleep()
            self._read_scope = None
            if scope.cancel_called:
                break
            if batch is None:
                continue
            self._outage.ok()
            backoff.reset()
            entries, counts = batch
            if start != ">":
                if not entries:
                    return False  # our backlog is drained
                start = entries[-1][0]  # the backlog is read by id: move past what we have
            for entry_id, fields in entries:
                if not fields or entry_id in self._in_flight:
                    continue  # trimmed while pending (acknowledged by _read), or running
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
            if failed and start == ">":
                return True
        return False

    async def _read(
        self, start: str, count: int
    ) -> tuple[list[tuple[str, dict[bytes, bytes]]], dict[str, int]]:
        """One read: the entries, and for the backlog how often each was delivered."""
        try:
            reply = await self._redis.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: start},
                count=count,
                block=None if start != ">" else self._block_ms,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            # someone deleted the stream or the group under us: recreate, carry on
            log.warning("%s on %s; recreating the group", exc, self.stream)
            await ensure_group(self._redis, self.stream, self.group)
            return [], {}
        entries = read_entries(reply)
        counts: dict[str, int] = {}
        if start != ">" and entries:
            counts = await self._delivery_counts(entries)
        trimmed = [entry_id for entry_id, fields in entries if not fields]
        if trimmed:  # nothing left to run
            await self._redis.xack(self.stream, self.group, *trimmed)
        return entries, counts

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
        except Exception as exc:
            # The entry stays pending: another delivery (reclaim) retries it, and after
            # PLUGIND_MAX_DELIVERIES it is dead-lettered. The consumer itself goes on.
            if is_redis_outage(exc) or is_postgres_outage(exc):
                # the outage itself is logged once by the tracker; no traceback per entry
                log.warning(
                    "Handler of %s %s met an outage (%s); left pending",
                    self.stream,
                    delivery.entry_id,
                    describe(exc),
                )
            else:
                log.exception(
                    "Handler failed on %s %s; left pending", self.stream, delivery.entry_id
                )
        finally:
            self._in_flight.discard(delivery.entry_id)
            self._slot_freed.set()

    async def _wait_slot(self, timeout: float = 1.0) -> None:
        self._slot_freed = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._slot_freed.wait()

    async def _keepalive(self) -> None:
        while True:
            await anyio.sleep(self._keepalive_s)
            ids: list[Any] = list(self._in_flight)
            if not ids:
                continue
            try:
                # bounded: a call hung on a half-open connection must not outlast the takeover
                # (redis-py drops the connection it cancels, so the next one starts afresh)
                with anyio.fail_after(self._keepalive_s):
                    await self._redis.xclaim(
                        self.stream, self.group, self.consumer, 0, ids, justid=True
                    )
            except TimeoutError:
                log.warning(
                    "Keep-alive of %d %s entries got no answer within %.1fs; retrying",
                    len(ids),
                    self.stream,
                    self._keepalive_s,
                )
            except Exception as exc:
                # A missed keep-alive only ages the entries a little: the next one catches up
                # long before another node's takeover (six intervals) would take them.
                if is_redis_outage(exc):
                    self._outage.failed(exc)
                elif isinstance(exc, ResponseError):
                    log.warning(
                        "Keep-alive of %d %s entries failed: %s", len(ids), self.stream, exc
                    )
                else:
                    raise
            else:
                self._outage.ok()

    async def reclaim(self, tg: anyio.abc.TaskGroup) -> int:
        """Take over stale entries of other consumers once; returns how many were taken."""
        found = await reclaim_once(
            self._redis,
            stream=self.stream,
            group=self.group,
            consumer=self.consumer,
            in_flight=self._in_flight,
            min_idle_ms=int(self._takeover_after_s * 1000),
            max_deliveries=self._max_deliveries,
            limit=max(self.concurrency - len(self._in_flight), 0),
        )
        taken = self._take(tg, found, "Took over")
        self.taken_over += taken
        return taken

    async def forget_gone_consumers(self, idle_s: float = GONE_AFTER_S) -> list[str]:
        """Delete the group's consumers that hold nothing and were not heard of for ``idle_s``.

        Every node that ever ran leaves its consumer name in the group (a restart under
        ``<hostname>-<pid>`` is a new one); a live consumer reads every second or so, so one idle
        for an hour with no pending entry is gone. A consumer deleted by mistake would only be
        created again by its next read.
        """
        consumers: list[dict[Any, Any]] = await self._redis.xinfo_consumers(self.stream, self.group)
        gone = [
            text(c["name"])
            for c in consumers
            if int(c.get("pending", 0)) == 0
            and int(c.get("idle", 0)) >= idle_s * 1000
            and text(c["name"]) != self.consumer
        ]
        for name in gone:
            await self._redis.xgroup_delconsumer(self.stream, self.group, name)
        if gone:
            log.info("Forgot %d consumer(s) of %s gone for an hour", len(gone), self.stream)
        return gone

    async def _adopt_orphans(self, tg: anyio.abc.TaskGroup) -> None:
        """After an outage: run our own pending entries that no handler of ours is running.

        If a read's reply was lost with the connection, Redis counts its entries as delivered to
        us, yet nobody runs them; without this they would wait for a takeover (their idle time
        reaching ``takeover_after_s``). Only our own entries are taken, whatever their idle time.
        """
        try:
            found = await retry_redis(
                lambda: reclaim_once(
                    self._redis,
                    stream=self.stream,
                    group=self.group,
                    consumer=self.consumer,
                    in_flight=self._in_flight,
                    min_idle_ms=0,
                    max_deliveries=self._max_deliveries,
                    limit=max(self.concurrency - len(self._in_flight), 0),
                    owner=self.consumer,
                ),
                self._outage,
            )
        except ResponseError as exc:  # e.g. the group vanished: the next read recreates it
            log.warning("Looking for orphaned %s entries failed: %s", self.stream, exc)
            return
        self._take(tg, found, "Took back")

    def _take(self, tg: anyio.abc.TaskGroup, found: Reclaimed, verb: str) -> int:
        for delivery in found.run:
            if delivery.entry_id in self._in_flight:
                continue  # the reclaim loop and an adoption both claimed it: run it once
            owner, idle_ms = found.owners.get(delivery.entry_id, (self.consumer, 0))
            if owner == self.consumer:
                log.info(
                    "%s %s %s (delivery %d)",
                    verb,
                    self.stream,
                    delivery.entry_id,
                    delivery.deliveries,
                )
            else:
                log.warning(
                    "%s %s %s from %s, silent for %.1fs (delivery %d)",
                    verb,
                    self.stream,
                    delivery.entry_id,
                    owner,
                    idle_ms / 1000,
                    delivery.deliveries,
                )
            self.dispatch(tg, delivery)
        for delivery in found.dead:
            if self._on_dead is not None and delivery.entry_id not in self._in_flight:
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
        interval = max(self._takeover_after_s / SCANS_PER_TAKEOVER, 0.05)
        while not self._stopping.is_set():
            await anyio.sleep(interval)
            if self._stopping.is_set():
                return
            try:
                await self.reclaim(tg)
                if anyio.current_time() >= self._next_sweep:
                    self._next_sweep = anyio.current_time() + SWEEP_EVERY_S
                    await self.forget_gone_consumers()
            except Exception as exc:
                # reclaim is a safety net that runs again in a moment: never end the consumer
                if is_redis_outage(exc):
                    self._outage.failed(exc)
                elif isinstance(exc, ResponseError):
                    log.warning("Reclaiming on %s failed: %s", self.stream, exc)
                else:
                    raise
            else:
                self._outage.ok()
