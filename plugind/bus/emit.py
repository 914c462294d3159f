"""Appending events: progress events plainly, terminal events through the atomic commit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis

from plugind.bus import scripts
from plugind.bus.autopipeline import AutoPipeline
from plugind.bus.codec import EVENT_FIELD, text
from plugind.bus.delivery import Delivery
from plugind.bus.keys import WORKERS_GROUP, Keys, installed_field
from plugind.messages import Event, encode

OUTPUT_TTL_S = 600


@dataclass(frozen=True, slots=True)
class RegistryChange:
    """How a terminal install/uninstall changes the workers' installed-plugin registry."""

    op: Literal["set", "del"]
    tenant_id: str
    plugin_id: str
    identifier: str = ""


class Emitter:
    def __init__(self, redis: aioredis.Redis, keys: Keys, *, dedupe_ttl: int) -> None:
        self._redis = redis
        self._keys = keys
        self._dedupe_ttl = dedupe_ttl
        self._commit = redis.register_script(scripts.TERMINAL_COMMIT)
        self._dead = redis.register_script(scripts.DEAD_LETTER)
        self.pipeline = AutoPipeline(redis)

    async def emit(self, event: Event) -> str:
        """Append a non-terminal event (progress, started)."""
        entry_id = await self.pipeline.execute(
            "XADD", self._keys.events, "*", EVENT_FIELD, encode(event)
        )
        return text(entry_id)

    async def already_done(self, request_id: str) -> bool:
        return bool(await self.pipeline.execute("EXISTS", self._keys.done(request_id)))

    async def ack(self, delivery: Delivery) -> None:
        await self.pipeline.execute("XACK", delivery.stream, WORKERS_GROUP, delivery.entry_id)

    async def chunk(self, request_id: str, chunk: Any) -> None:
        """Publish one live chunk of a streaming task to its output stream."""
        out = self._keys.out(request_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(out, {"chunk": orjson.dumps(chunk)})
            pipe.expire(out, OUTPUT_TTL_S * 6)
            await pipe.execute()

    async def terminal(
        self,
        delivery: Delivery,
        event: Event,
        *,
        use_marker: bool = True,
        registry: RegistryChange | None = None,
        output: bool = False,
    ) -> str | None:
        """The one atomic terminal step; returns the event's id, or None if it had already ended."""
        keys = self._keys
        result = await self.pipeline.evalsha(
            self._commit.sha,
            scripts.TERMINAL_COMMIT,
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
        return text(result) if result else None

    async def dead_letter(
        self, delivery: Delivery, event: Event, *, error: dict[str, Any]
    ) -> str | None:
        fields = {text(k): text(v) for k, v in delivery.fields.items()}
        result = await self._dead(
            keys=[
                delivery.stream,
                self._keys.events,
                self._keys.done(event.request_id),
                self._keys.dead,
            ],
            args=[
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
