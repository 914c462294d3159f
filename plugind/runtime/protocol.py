"""Dify's stdio protocol between the daemon and one plugin process, as lines.

Daemon → plugin: one JSON object per ``\\n``-terminated line (a request, or the answer to a
plugin's backwards invocation). Plugin → daemon: one JSON object per line, most followed by an
empty line, with sessions multiplexed by ``session_id``. Lines can be huge: the SDK never splits
a text or JSON message, so a 6 MiB text is one line. :class:`LineSplitter` therefore has a
limit set from the result size cap, not a small buffer size, and a line over it fails only its
own session (``result_too_large``) instead of the whole process.

This module is pure (no I/O), so the codec is tested without a plugin process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from plugind.errors import PlugindError


@dataclass(frozen=True, slots=True)
class PluginRequest:
    """One invocation: Dify's request ``type`` (``access``), ``action`` and body (``payload``)."""

    access: str
    action: str
    payload: dict[str, Any]
    user_id: str = ""
    conversation_id: str | None = None
    message_id: str | None = None
    app_id: str | None = None
    endpoint_id: str | None = None
    context: dict[str, Any] | None = None


def encode_request(session_id: str, request: PluginRequest) -> bytes:
    """The request line of a session.

    ``type`` and ``action`` come from the request, never from the payload, because they pick
    the plugin's route; ``user_id`` is the request's, or the payload's when the request has none.
    """
    data = dict(request.payload)
    data["type"] = request.access
    data["action"] = request.action
    if request.user_id or "user_id" not in data:
        data["user_id"] = request.user_id
    line = {
        "session_id": session_id,
        "conversation_id": request.conversation_id,
        "message_id": request.message_id,
        "app_id": request.app_id,
        "endpoint_id": request.endpoint_id,
        "context": request.context,
        "event": "request",
        "data": data,
    }
    try:
        return orjson.dumps(line) + b"\n"
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise PlugindError(
            "malformed_command", f"the payload cannot be sent as JSON: {exc}"
        ) from None


def encode_backwards(
    session_id: str,
    backwards_request_id: str,
    event: str,
    *,
    message: str = "",
    data: Any = None,
    request: PluginRequest | None = None,
) -> bytes:
    """One answer to a plugin's backwards invocation: ``response``, ``error`` or ``end``.

    The session's context fields are repeated from its ``request``, as upstream does; the SDK
    matches the answer on ``backwards_request_id`` alone.
    """
    line = {
        "session_id": session_id,
        "conversation_id": request.conversation_id if request else None,
        "message_id": request.message_id if request else None,
        "app_id": request.app_id if request else None,
        "endpoint_id": request.endpoint_id if request else None,
        "context": request.context if request else None,
        "event": "backwards_response",
        "data": {
            "backwards_request_id": backwards_request_id,
            "event": event,
            "message": message,
            "data": data,
        },
    }
    return orjson.dumps(line) + b"\n"


def encode_backwards_error(session_id: str, backwards_request_id: str, message: str) -> bytes:
    """The answer refusing a plugin's backwards invocation (a call into Dify we cannot make)."""
    line = {
        "session_id": session_id,
        "event": "backwards_response",
        "data": {
            "backwards_request_id": backwards_request_id,
            "event": "error",
            "message": message,
            "data": None,
        },
    }
    return orjson.dumps(line) + b"\n"


# ---------------------------------------------------------------------------------------------
# plugin → daemon


@dataclass(frozen=True, slots=True)
class Declaration:
    """The first line: the plugin's manifest as the SDK parsed it (no ``event`` key)."""

    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Log:
    level: str
    message: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class Chunk:
    """A ``stream`` message of a session; ``size`` is its line's length, for the result cap."""

    session_id: str
    data: Any
    size: int


@dataclass(frozen=True, slots=True)
class SessionError:
    session_id: str
    error_type: str
    message: str
    args: Any


@dataclass(frozen=True, slots=True)
class End:
    session_id: str


@dataclass(frozen=True, slots=True)
class Invoke:
    """A backwards invocation: the plugin asks the daemon to call Dify for it."""

    session_id: str
    data: Any


@dataclass(frozen=True, slots=True)
class StreamError:
    """A top-level ``error``: the plugin could not parse one of our lines."""

    message: str


@dataclass(frozen=True, slots=True)
class Oversized:
    """A line over the limit, dropped; ``session_id`` is read from its start when possible."""

    session_id: str | None
    size: int


@dataclass(frozen=True, slots=True)
class Garbage:
    """A line that is not protocol: usually plugin code printing to stdout."""

    text: str


PluginMessage = (
    Declaration
    | Log
    | Heartbeat
    | Chunk
    | SessionError
    | End
    | Invoke
    | StreamError
    | Oversized
    | Garbage
)

_SESSION_ID = re.compile(rb'"session_id"\s*:\s*"([^"\\]{1,256})"')


def _session_of(head: bytes | bytearray) -> str | None:
    match = _SESSION_ID.search(bytes(head[:1024]))
    return match[1].decode("utf-8", "replace") if match else None


def decode_line(line: bytes) -> PluginMessage:
    """Parse one non-empty line the plugin wrote."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return Garbage(line[:2000].decode("utf-8", "replace"))
    if not isinstance(obj, dict):
        return Garbage(line[:2000].decode("utf-8", "replace"))
    event = obj.get("event")
    data = obj.get("data")
    if event is None:
        return Declaration(obj)
    if event == "heartbeat":
        return Heartbeat()
    if event == "log" and isinstance(data, dict):
        return Log(str(data.get("level") or "INFO"), str(data.get("message", "")))
    if event == "error":
        detail = data.get("error") if isinstance(data, dict) else data
        return StreamError(str(detail))
    session_id = obj.get("session_id")
    if event == "session" and isinstance(session_id, str) and isinstance(data, dict):
        kind = data.get("type")
        inner = data.get("data")
        if kind == "stream":
            return Chunk(session_id, inner, len(line))
        if kind == "end":
            return End(session_id)
        if kind == "error":
            detail = inner if isinstance(inner, dict) else {"message": inner}
            return SessionError(
                session_id,
                error_type=str(detail.get("error_type") or "PluginError"),
                message=str(detail.get("message", "")),
                args=detail.get("args"),
            )
        if kind == "invoke":
            return Invoke(session_id, inner)
    return Garbage(line[:2000].decode("utf-8", "replace"))


class LineSplitter:
    """Turns the plugin's stdout bytes into complete non-empty lines, however long.

    Scanning resumes where the last search stopped, so a 6 MiB line arriving in 64 KiB reads
    costs one pass, not one pass per read. A line longer than ``max_line`` is dropped as it
    arrives (memory stays bounded) and reported once as :class:`Oversized`.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        out: list[bytes | Oversized] = []
        if self._skipping:
            cut = data.find(b"\n")
            if cut < 0:
                return out
            data = data[cut + 1 :]
            self._skipping = False
        buffer = self._buffer
        scan = len(buffer)
        buffer += data
        start = 0
        while (cut := buffer.find(b"\n", scan)) >= 0:
            if cut - start > self.max_line:
                out.append(Oversized(_session_of(buffer[start : start + 1024]), cut - start))
            elif cut > start and not buffer[start:cut].isspace():
                out.append(bytes(buffer[start:cut]))
            start = scan = cut + 1
        del buffer[:start]
        if len(buffer) > self.max_line:
            out.append(Oversized(_session_of(buffer), len(buffer)))
            buffer.clear()
            self._skipping = True
        return out

    def flush(self) -> list[bytes | Oversized]:
        """The last line if the stream ended without a newline."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._skipping = False
        return [rest] if rest.strip() else []
