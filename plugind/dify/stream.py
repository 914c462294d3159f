"""Relaying a streaming task's live output to a Dify client as server-sent events.

A dispatch publishes a task command with ``"stream": true``; the worker running it appends each
plugin chunk to ``{ns}:out:<request_id>`` as it arrives (field ``chunk``) and, in the same atomic
step as the terminal event, one entry ``end`` holding that event. The relay follows that stream
(:class:`plugind.bus.output.OutputFollower`, ``XREAD BLOCK``) and writes one
``data: <envelope>`` frame per entry, so a token reaches the HTTP client one Redis round trip
after the plugin wrote it. Nothing else is ever written (no keep-alive comments): dify-api
parses every non-blank line as JSON.

Requests that end without an ``end`` entry (a rejected or dead-lettered command) are noticed
by the follower through their ``done`` marker whenever the stream is idle, and a request that
never ends gets the upstream timeout frame at its deadline.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

import anyio
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from plugind.bus.keys import Keys
from plugind.bus.output import Chunk, End, Output, OutputFollower
from plugind.dify import envelope as env
from plugind.dify.envelope import DifyError
from plugind.messages import (
    AnyEvent,
    CommandDeadLettered,
    CommandRejected,
    TaskFailed,
    TaskSucceeded,
    TaskTimedOut,
)

log = logging.getLogger(__name__)

# How long one XREAD blocks before the relay looks at the done marker and its deadline.
IDLE_CHECK_S: Final = 2.0
READ_COUNT: Final = 512
# Error codes of a failed task that mean "this tenant has no such plugin".
NOT_FOUND_CODES: Final = frozenset({"not_installed", "unknown_plugin"})


def terminal_error(event: AnyEvent) -> DifyError | None:
    """The error frame a request's terminal event becomes (None: it succeeded)."""
    if isinstance(event, TaskSucceeded):
        return None
    if isinstance(event, TaskTimedOut):
        return env.timeout_error()
    if isinstance(event, TaskFailed):
        error = event.error
        if error.code == "plugin_error":
            return env.invoke_error(error.error_type, error.message, error.args)
        if error.code == "timeout":
            return env.timeout_error()
        if error.code in NOT_FOUND_CODES:
            return env.plugin_not_found(error.message)
        return env.internal_error(error.message, {"code": error.code})
    if isinstance(event, CommandRejected):
        return env.bad_request(event.error.message, {"code": event.error.code})
    if isinstance(event, CommandDeadLettered):
        return env.internal_error(event.error.message, {"code": event.error.code})
    return env.internal_error(f"request ended with an unexpected {type(event).__name__} event")


async def relay(
    redis: aioredis.Redis,
    keys: Keys,
    request_id: str,
    *,
    deadline_s: float,
    idle_check_s: float = IDLE_CHECK_S,
) -> AsyncIterator[bytes]:
    """The SSE frames of ``request_id``'s output, as they come, ending with its outcome.

    Each item is the frames of one read (one or more), so a burst of chunks is one write. Losing
    Redis mid-stream ends the stream with an error frame rather than a cut-off answer.
    """
    try:
        async for frames in _relay(redis, keys, request_id, deadline_s, idle_check_s):
            yield frames
    except redis_errors.RedisError as exc:
        log.warning("Dify stream %s: lost Redis: %s", request_id, exc)
        yield env.sse_error(env.internal_error(f"lost the task's output stream: {exc}"))


async def _relay(
    redis: aioredis.Redis, keys: Keys, request_id: str, deadline_s: float, idle_check_s: float
) -> AsyncIterator[bytes]:
    output = OutputFollower(
        redis,
        keys,
        request_id,
        block_ms=max(1, int(idle_check_s * 1000)),
        count=READ_COUNT,
        until=anyio.current_time() + deadline_s,
    )
    async for batch in output:
        if batch is None:
            continue
        frames = [frame for item in batch if (frame := _frame(item, request_id)) is not None]
        if frames:
            yield b"".join(frames)  # what came in one read leaves in one write
    if not output.ended:
        log.warning("Dify stream %s: no outcome within %gs", request_id, deadline_s)
        yield env.sse_error(env.timeout_error())


def _frame(item: Output, request_id: str) -> bytes | None:
    """The frame of one item of the output: a chunk, or the error its end is (None: success)."""
    if isinstance(item, Chunk):
        return env.sse_raw_chunk(item.data)
    if not isinstance(item, End):
        return None  # the request's other events: only followed along with the events stream
    err: DifyError | None
    try:
        event = item.event()
    except msgspec.DecodeError as exc:
        err = env.internal_error(f"the request's outcome could not be read: {exc}")
    else:
        if event is None:
            err = env.internal_error(
                f"request {request_id} ended but its outcome is no longer in the events stream"
            )
        else:
            err = terminal_error(event)
    return env.sse_error(err) if err is not None else None


class SSEResponse(StreamingResponse):
    """``text/event-stream`` whose body stops as soon as the client goes away.

    Starlette's ``StreamingResponse`` notices a disconnect only when the ASGI server reports an
    old spec version, or at the next write; a relay may sit in ``XREAD BLOCK`` for seconds with
    nothing to write (it may never write a keep-alive to a Dify client), so this response always
    listens for ``http.disconnect`` and then cancels the body, which ends the relay.
    """

    media_type = env.SSE_MEDIA_TYPE

    def __init__(self, frames: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        super().__init__(
            frames,
            status_code=200,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
            media_type=self.media_type,
        )
        self.frames = frames
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await send(
                            {
                                "type": "http.response.start",
                                "status": self.status_code,
                                "headers": self.raw_headers,
                            }
                        )
                        async for frame in self.frames:
                            await send(
                                {"type": "http.response.body", "body": frame, "more_body": True}
                            )
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        self.disconnected = True
                        tg.cancel_scope.cancel()
                        break
        finally:
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await aclose()
