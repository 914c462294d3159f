"""Relaying a streaming task's live output to a Dify client as server-sent events.

A dispatch publishes a task command with ``"stream": true``; the worker running it appends each
plugin chunk to ``{ns}:out:<request_id>`` as it arrives (field ``chunk``) and, in the same atomic
step as the terminal event, one entry ``end`` holding that event. The relay reads that stream
with ``XREAD BLOCK`` and writes one ``data: <envelope>`` frame per entry, so a token reaches the
HTTP client one Redis round trip after the plugin wrote it. Nothing else is ever written (no
keep-alive comments): dify-api parses every non-blank line as JSON.

Requests that end without an ``end`` entry (a rejected or dead-lettered command) are noticed
through their ``done`` marker whenever the stream is idle, and a request that never ends gets
the upstream timeout frame at its deadline.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from plugind.bus.codec import EVENT_FIELD, text
from plugind.bus.keys import Keys
from plugind.dify import envelope as env
from plugind.dify.envelope import DifyError
from plugind.messages import (
    AnyEvent,
    CommandDeadLettered,
    CommandRejected,
    TaskFailed,
    TaskSucceeded,
    TaskTimedOut,
    decode_event,
)

log = logging.getLogger(__name__)

CHUNK_FIELD: Final = b"chunk"
END_FIELD: Final = b"end"
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
    out = keys.out(request_id)
    cursor = "0-0"
    deadline = anyio.current_time() + deadline_s
    while True:
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            log.warning("Dify stream %s: no outcome within %gs", request_id, deadline_s)
            yield env.sse_error(env.timeout_error())
            return
        block_ms = max(1, int(min(remaining, idle_check_s) * 1000))
        reply: Any = await redis.xread({out: cursor}, count=READ_COUNT, block=block_ms)
        if reply:
            frames, cursor, done = _frames(reply[0][1], cursor)
            if frames:
                yield b"".join(frames)  # what came in one read leaves in one write
            if done:
                return
            continue
        # Idle: did the request end without writing its output stream's end?
        marker: Any = await redis.get(keys.done(request_id))
        if not marker:
            continue
        # It ended. Drain what reached the output stream meanwhile, then its outcome.
        rest: Any = await redis.xrange(out, min=f"({cursor}" if cursor != "0-0" else "-")
        frames, cursor, done = _frames(rest, cursor)
        if not done:
            event = await _event_at(redis, keys, text(marker))
            err: DifyError | None
            if event is None:
                err = env.internal_error(
                    f"request {request_id} ended but its outcome is no longer in the events stream"
                )
            else:
                err = terminal_error(event)
            if err is not None:
                frames.append(env.sse_error(err))
        if frames:
            yield b"".join(frames)
        return


def _frames(entries: list[Any], cursor: str) -> tuple[list[bytes], str, bool]:
    """The frames of some output stream entries, the last entry id, and whether it ended."""
    frames: list[bytes] = []
    for entry_id, fields in entries:
        cursor = text(entry_id)
        chunk = fields.get(CHUNK_FIELD)
        if chunk is not None:
            frames.append(env.sse_raw_chunk(chunk))
            continue
        end = fields.get(END_FIELD)
        if end is None:
            continue
        try:
            err = terminal_error(decode_event(end))
        except msgspec.DecodeError as exc:
            err = env.internal_error(f"the request's outcome could not be read: {exc}")
        if err is not None:
            frames.append(env.sse_error(err))
        return frames, cursor, True
    return frames, cursor, False


async def _event_at(redis: aioredis.Redis, keys: Keys, entry_id: str) -> AnyEvent | None:
    entries: Any = await redis.xrange(keys.events, min=entry_id, max=entry_id, count=1)
    if not entries:
        return None
    raw = entries[0][1].get(EVENT_FIELD.encode())
    return decode_event(raw) if raw is not None else None


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
