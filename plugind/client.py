"""The Python producer API: publish commands and wait for their terminal events.

``wait`` never misses an event: the client notes the events stream's last id *before* it
appends a command and follows the stream from there, and the request's ``done`` marker (which
holds the terminal event's stream id) answers at once for requests that ended long ago.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import redis.asyncio as aioredis

from plugind.bus.cluster import SlotPin
from plugind.bus.codec import command_fields, text
from plugind.bus.follow import START, EventFollower, event_at, events_tail
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
    is_terminal,
    new_event_id,
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
        await SlotPin(self.redis, self.keys).pin()  # on a Redis Cluster, the namespace's master
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
        self._cursors[command.request_id] = await events_tail(self.redis, self.keys)
        await publish(self.redis, self.keys, command)
        return command.request_id

    async def send_many(self, commands: list[AnyCommand]) -> list[str]:
        """Publish many commands in one round trip (a pipeline); returns their request ids."""
        cursor = await events_tail(self.redis, self.keys)
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
        found = await self._from_marker(request_id)
        if found is not None:
            return found
        follower = EventFollower(
            self.redis,
            self.keys,
            after=self._cursors.get(request_id, START),
            request_id=request_id,
            until=anyio.current_time() + timeout,
        )
        async for followed in follower:
            if followed is None:  # a quiet second: it may have ended before our cursor
                found = await self._from_marker(request_id)
                if found is not None:
                    return found
            elif is_terminal(followed.event):
                self._cursors.pop(request_id, None)
                return followed.event
            elif on_event is not None:
                on_event(followed.event)
        raise WaitTimeout(f"request {request_id} did not end within {timeout:g}s")

    async def events_of(self, request_id: str) -> list[AnyEvent]:
        """Every event of a request still in the events stream, in order (a full scan)."""
        follower = EventFollower(
            self.redis, self.keys, after=START, request_id=request_id, block_ms=None, count=1000
        )
        return [followed.event async for followed in follower if followed is not None]

    async def iter_events(
        self, after: str = START, batch: int = 1000
    ) -> AsyncIterator[tuple[str, AnyEvent]]:
        """Yield ``(entry_id, event)`` for every event in the stream after ``after``."""
        async for followed in EventFollower(
            self.redis, self.keys, after=after, block_ms=None, count=batch
        ):
            if followed is not None:
                yield followed.entry_id, followed.event

    async def _from_marker(self, request_id: str) -> AnyEvent | None:
        marker: Any = await self.redis.get(self.keys.done(request_id))
        return await event_at(self.redis, self.keys, text(marker)) if marker else None


def new_request_id() -> str:
    """A new UUIDv7: time-ordered, so the ``tasks`` table's key index grows at its end."""
    return new_event_id()
