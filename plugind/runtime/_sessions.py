"""The sessions in flight on one plugin process, and the routing of the plugin's replies.

Everything here runs on the event loop (the reader thread hands messages over with
``from_thread``), so there are no locks. A session's replies travel through an unbounded
memory stream to the task waiting in ``PluginProcess.invoke``, so the reader never waits for a
slow consumer; memory stays bounded because a session is failed with ``result_too_large`` as
soon as its replies pass the cap, and later replies to it are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from plugind.errors import PlugindError
from plugind.runtime import protocol

log = logging.getLogger(__name__)

Item = tuple[
    str, Any
]  # ("chunk", data) | ("end", None) | ("error", PlugindError) | ("invoke", data)


class Session:
    """The loop-side end of one invocation."""

    __slots__ = ("done", "max_size", "received", "send")

    def __init__(self, send: MemoryObjectSendStream[Item], max_size: int) -> None:
        self.send = send
        self.max_size = max_size
        self.received = 0
        self.done = False

    def put(self, kind: str, value: Any) -> None:
        if not self.done:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                self.send.send_nowait((kind, value))

    def finish(self, kind: str, value: Any) -> None:
        self.put(kind, value)
        self.done = True


class SessionTable:
    """Open sessions by id; replies for a session no longer open (timed out) are ignored."""

    def __init__(self, identifier: str) -> None:
        self.identifier = identifier
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session_id: str, max_size: int) -> MemoryObjectReceiveStream[Item]:
        send, receive = anyio.create_memory_object_stream[Item](math.inf)
        self._sessions[session_id] = Session(send, max_size)
        return receive

    def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.done = True
            session.send.close()

    def fail_all(self, error: Callable[[], PlugindError]) -> None:
        """End every open session with a fresh ``error()`` (the process is gone)."""
        for session in list(self._sessions.values()):
            session.finish("error", error())

    def route(self, message: protocol.PluginMessage) -> None:
        """Hand one session reply to its session."""
        if isinstance(message, protocol.Oversized):
            session = self._sessions.get(message.session_id or "")
            if session is not None:
                session.finish("error", self._too_large(session.max_size))
            else:
                log.warning("%s wrote a %d-byte line; dropped", self.identifier, message.size)
            return
        if not isinstance(
            message, protocol.Chunk | protocol.SessionError | protocol.End | protocol.Invoke
        ):
            return
        session = self._sessions.get(message.session_id)
        if session is None:
            return
        if isinstance(message, protocol.Chunk):
            session.received += message.size
            if session.received > session.max_size:
                session.finish("error", self._too_large(session.max_size))
            else:
                session.put("chunk", message.data)
        elif isinstance(message, protocol.SessionError):
            error = PlugindError(
                "plugin_error", message.message, error_type=message.error_type, args=message.args
            )
            session.finish("error", error)
        elif isinstance(message, protocol.End):
            session.finish("end", None)
        else:
            session.put("invoke", message.data)

    def _too_large(self, limit: int) -> PlugindError:
        return PlugindError(
            "result_too_large", f"{self.identifier} returned more than {limit} bytes"
        )
