"""The Python producer API: publish commands and wait for their terminal events.

``wait`` never misses an event: the client notes the events stream's last id *before* it
appends a command and reads from there, and the request's ``done`` marker (which holds the
terminal event's stream id) answers at once for requests that ended long ago.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import redis.asyncio as aioredis

from plugind.bus.codec import EVENT_FIELD, command_fields, text
from plugind.bus.keys import Keys
from plugind.bus.producer import publish, stream_for
from plugind.errors import WaitTimeout as WaitTimeout  # re-exported: producers catch it with Client
from plugind.messages import (
    AnyCommand,
    AnyEvent,
    InstallCommand,
    PackageRef,
    TaskCommand,
    UninstallCommand,
    decode_event,
    is_terminal,
)


class Client:
    def __init__(self, redis: aioredis.Redis, keys: Keys | None = None) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self._cursors: dict[str, str] = {}

    @classmethod
    def from_url(cls, url: str, namespace: str = "plugind") -> Client:
        return cls(aioredis.Redis.from_url(url), Keys(namespace))

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- publishing ---------------------------------------------------------------------------

    async def send(self, command: AnyCommand) -> str:
        """Publish any command; returns its request id."""
        self._cursors[command.request_id] = await self._events_tail()
        await publish(self.redis, self.keys, command)
        return command.request_id

    async def send_many(self, commands: list[AnyCommand]) -> list[str]:
        """Publish many commands in one round trip (a pipeline); returns their request ids."""
        cursor = await self._events_tail()
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in commands:
                self._cursors[command.request_id] = cursor
                pipe.xadd(stream_for(self.keys, command), command_fields(command))
            await pipe.execute()
        return [c.request_id for c in commands]

    async def install(
        self,
        package: bytes | Path | PackageRef,
        *,
        tenant_id: str = "default",
        request_id: str | None = None,
        expected_identifier: str | None = None,
    ) -> str:
        """Install a package given as bytes (sent inline), a file, or a :class:`PackageRef`."""
        if isinstance(package, Path):
            package = await anyio.Path(package).read_bytes()
        if isinstance(package, bytes):
            package = PackageRef(base64=base64.b64encode(package).decode())
        return await self.send(
            InstallCommand(
                request_id=request_id or new_request_id(),
                tenant_id=tenant_id,
                package=package,
                expected_identifier=expected_identifier,
            )
        )

    async def uninstall(
        self, plugin_id: str, *, tenant_id: str = "default", request_id: str | None = None
    ) -> str:
        return await self.send(
            UninstallCommand(
                request_id=request_id or new_request_id(), tenant_id=tenant_id, plugin_id=plugin_id
            )
        )

    async def invoke(
        self,
        plugin_id: str,
        *,
        access: str,
        action: str,
        payload: dict[str, Any],
        tenant_id: str = "default",
        user_id: str = "",
        timeout_s: float | None = None,
        stream: bool = False,
        request_id: str | None = None,
    ) -> str:
        return await self.send(
            TaskCommand(
                request_id=request_id or new_request_id(),
                tenant_id=tenant_id,
                plugin_id=plugin_id,
                access=access,
                action=action,
                payload=payload,
                user_id=user_id,
                timeout_s=timeout_s,
                stream=stream,
            )
        )

    async def invoke_tool(
        self,
        plugin_id: str,
        provider: str,
        tool: str,
        parameters: dict[str, Any],
        *,
        credentials: dict[str, Any] | None = None,
        **options: Any,
    ) -> str:
        payload = {
            "provider": provider,
            "tool": tool,
            "tool_parameters": parameters,
            "credentials": credentials or {},
        }
        return await self.invoke(
            plugin_id, access="tool", action="invoke_tool", payload=payload, **options
        )

    # -- waiting ------------------------------------------------------------------------------

    async def wait(
        self,
        request_id: str,
        timeout: float = 60.0,
        *,
        on_event: Callable[[AnyEvent], None] | None = None,
    ) -> AnyEvent:
        """The request's terminal event; raises :class:`WaitTimeout` if it has not come in time.

        ``on_event`` sees the request's other events (started, progress) as they come.
        """
        deadline = time.monotonic() + timeout
        found = await self._from_marker(request_id)
        if found is not None:
            return found
        cursor = self._cursors.get(request_id, "0-0")
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"request {request_id} did not end within {timeout:g}s")
            reply: Any = await self.redis.xread(
                {self.keys.events: cursor}, count=500, block=max(1, int(min(remaining, 1.0) * 1000))
            )
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    cursor = text(entry_id)
                    raw = fields.get(EVENT_FIELD.encode())
                    if raw is None or request_id.encode() not in raw:
                        continue  # cheap filter before decoding
                    event = decode_event(raw)
                    if event.request_id != request_id:
                        continue
                    if is_terminal(event):
                        self._cursors.pop(request_id, None)
                        return event
                    if on_event is not None:
                        on_event(event)
            if not reply:
                found = await self._from_marker(request_id)
                if found is not None:
                    return found

    async def events_of(self, request_id: str) -> list[AnyEvent]:
        """Every event of a request still in the events stream, in order (a full scan)."""
        out: list[AnyEvent] = []
        async for _entry_id, event in self.iter_events():
            if event.request_id == request_id:
                out.append(event)
        return out

    async def iter_events(self, start: str = "-", batch: int = 1000) -> Any:
        """Yield ``(entry_id, event)`` for every event in the stream from ``start``."""
        lower = start
        while True:
            entries: Any = await self.redis.xrange(self.keys.events, min=lower, count=batch)
            for entry_id, fields in entries:
                raw = fields.get(EVENT_FIELD.encode())
                if raw is not None:
                    yield text(entry_id), decode_event(raw)
            if len(entries) < batch:
                return
            lower = "(" + text(entries[-1][0])

    async def _events_tail(self) -> str:
        last: Any = await self.redis.xrevrange(self.keys.events, count=1)
        return text(last[0][0]) if last else "0-0"

    async def _from_marker(self, request_id: str) -> AnyEvent | None:
        marker: Any = await self.redis.get(self.keys.done(request_id))
        if not marker:
            return None
        entries: Any = await self.redis.xrange(self.keys.events, min=marker, max=marker, count=1)
        if not entries:
            return None  # trimmed: the event log in Postgres still has it
        return decode_event(entries[0][1][EVENT_FIELD.encode()])


def new_request_id() -> str:
    return str(uuid.uuid4())
