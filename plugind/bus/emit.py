"""Appending events: progress events plainly, terminal events through the atomic commit.

Every write here rides out Redis outages (see ``bus.autopipeline``): a handler whose plugin has
finished keeps its outcome and commits it as soon as Redis answers again, so the request ends
within about a second of Redis's return rather than after a reclaim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import orjson
import redis.asyncio as aioredis

from plugind.bus import scripts
from plugind.bus.autopipeline import AutoPipeline, BatchedScript, Reply
from plugind.bus.codec import EVENT_FIELD, text
from plugind.bus.delivery import Delivery
from plugind.bus.keys import WORKERS_GROUP, Keys, installed_field
from plugind.messages import Event, decode_event, encode
from plugind.outage import Dependency, retry_redis

log = logging.getLogger(__name__)

OUTPUT_TTL_S = 600

# The terminal commits of the requests ending at the same time go to Redis as one script call
# (bus.scripts.TERMINAL_COMMIT_MANY): each is exactly TERMINAL_COMMIT, one after the other.
TERMINAL_COMMITS = BatchedScript(
    scripts.TERMINAL_COMMIT_MANY, scripts.TERMINAL_COMMIT_KEYS, scripts.TERMINAL_COMMIT_ARGS
)


@dataclass(frozen=True, slots=True)
class RegistryChange:
    """How a terminal install/uninstall changes the workers' installed-plugin registry."""

    op: Literal["set", "del"]
    tenant_id: str
    plugin_id: str
    identifier: str = ""


class Emitter:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        dedupe_ttl: int,
        outage: Dependency | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._dedupe_ttl = dedupe_ttl
        self._dead = redis.register_script(scripts.DEAD_LETTER)
        self.pipeline = AutoPipeline(redis, outage=outage)

    async def emit(self, event: Event) -> str:
        """Append a non-terminal event (progress, started)."""
        entry_id = await self.pipeline.execute(
            "XADD", self._keys.events, "*", EVENT_FIELD, encode(event)
        )
        return text(entry_id)

    def emit_soon(self, event: Event) -> Reply:
        """Queue a non-terminal event now; await the reply (its id) later, before the request's
        terminal commit, which then follows it in the stream."""
        return self.pipeline.submit("XADD", self._keys.events, "*", EVENT_FIELD, encode(event))

    async def already_done(self, request_id: str) -> bool:
        return bool(await self.pipeline.execute("EXISTS", self._keys.done(request_id)))

    def done_soon(self, request_id: str) -> Reply:
        """:meth:`already_done`, queued now (the reply is the done marker's ``EXISTS`` count)."""
        return self.pipeline.submit("EXISTS", self._keys.done(request_id))

    async def ack(self, delivery: Delivery) -> None:
        await self.pipeline.execute("XACK", delivery.stream, WORKERS_GROUP, delivery.entry_id)

    async def chunk(self, request_id: str, chunk: Any) -> None:
        """Publish one live chunk of a streaming task to its output stream.

        Retried through outages like every other write; after a dropped connection a live chunk
        may appear twice in the output stream (the terminal event's result is exact).
        """
        out = self._keys.out(request_id)
        data = orjson.dumps(chunk)

        async def send() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(out, {"chunk": data})
                pipe.expire(out, OUTPUT_TTL_S * 6)
                await pipe.execute()

        await retry_redis(send, self.pipeline.outage)

    async def terminal(
        self,
        delivery: Delivery,
        event: Event,
        *,
        use_marker: bool = True,
        registry: RegistryChange | None = None,
        output: bool = False,
    ) -> str | None:
        """The one atomic terminal step; returns the event's id, or None if it had already ended.

        Requests that end at the same time share one script call (``TERMINAL_COMMITS``), which
        commits each of them exactly as a call of its own would.
        Retried through Redis outages and after a lost script cache (see ``bus.autopipeline``).
        That is safe: with a marker, the script appends nothing once the marker exists; without
        one, nothing once the entry is acknowledged. If an earlier attempt did land and only its
        reply was lost, the retry finds the request ended, and the marker tells whether by this
        very event: then its id is returned as if the first reply had arrived.
        """
        keys = self._keys
        result = await self.pipeline.call_batched(
            TERMINAL_COMMITS,
            [
                delivery.stream,
                keys.events,
                keys.done(event.request_id),
                keys.installed,
                keys.out(event.request_id),
            ],
            [
                WORKERS_GROUP,
                delivery.entry_id,
                encode(event),
                self._dedupe_ttl,
                "1" if use_marker and event.request_id else "0",
                registry.op if registry else "",
                installed_field(registry.tenant_id, registry.plugin_id) if registry else "",
                registry.identifier if registry else "",
                OUTPUT_TTL_S if output else 0,
            ],
        )
        if result:
            return text(result)
        if use_marker and event.request_id:
            return await self._committed_before(event)
        return None

    async def _committed_before(self, event: Event) -> str | None:
        """The stream id of ``event`` if the request's done marker points at it, else None."""
        marker: Any = await self.pipeline.execute("GET", self._keys.done(event.request_id))
        if not marker:
            return None
        entries: Any = await self.pipeline.execute("XRANGE", self._keys.events, marker, marker)
        if not entries:
            return None
        raw = entries[0][1].get(EVENT_FIELD.encode())
        try:
            found = decode_event(raw) if raw else None
        except msgspec.DecodeError:
            return None
        if found is None or found.event_id != event.event_id:
            return None  # another delivery of the request ended it
        log.info(
            "Terminal event of request_id=%s had been committed before its reply was lost",
            event.request_id,
        )
        return text(marker)

    async def dead_letter(
        self, delivery: Delivery, event: Event, *, error: dict[str, Any]
    ) -> str | None:
        """Move ``delivery`` to the dead letters with its terminal event, exactly once.

        Retried like :meth:`terminal`; the script's ``XACK`` gates every step, so a repeat after
        a lost reply adds nothing.
        """
        fields = {text(k): text(v) for k, v in delivery.fields.items()}
        result = await self.pipeline.evalsha(
            self._dead.sha,
            scripts.DEAD_LETTER,
            [
                delivery.stream,
                self._keys.events,
                self._keys.done(event.request_id),
                self._keys.dead,
            ],
            [
                WORKERS_GROUP,
                delivery.entry_id,
                encode(event),
                self._dedupe_ttl,
                "1" if event.request_id else "0",
                orjson.dumps(fields),
                delivery.deliveries,
                orjson.dumps(error),
            ],
        )
        return text(result) if result else None
