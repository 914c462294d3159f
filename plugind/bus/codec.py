"""How commands and events sit in stream entries: one field holding JSON.

One JSON field (``cmd`` or ``event``) rather than a flat hash keeps nested payloads intact and
lets any language produce with a plain XADD.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from plugind.messages import Command, Event, encode

CMD_FIELD: Final = "cmd"
EVENT_FIELD: Final = "event"
RAW_PREVIEW_BYTES: Final = 1024


def command_fields(command: Command) -> dict[Any, Any]:
    return {CMD_FIELD: encode(command)}


def event_fields(event: Event) -> dict[Any, Any]:
    return {EVENT_FIELD: encode(event)}


def text(value: bytes | str) -> str:
    """Redis answers in bytes unless the client decodes; plugind never asks it to."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def field(fields: Mapping[Any, Any] | None, name: str) -> bytes | None:
    """One field of an entry, whether the client handed back its keys as bytes or as str."""
    if not fields:
        return None
    value = fields.get(name.encode())
    if value is None:
        value = fields.get(name)
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else bytes(value)


def read_entries(reply: Any) -> list[tuple[str, dict[Any, Any]]]:
    """``(entry_id, fields)`` pairs of an XREAD/XREADGROUP reply, RESP2 (list) or RESP3 (dict).

    An entry deleted while pending comes back without fields: it is kept, with ``{}``, because a
    group reader still has to acknowledge it.
    """
    return [(entry_id, fields) for _stream, entry_id, fields in read_stream_entries(reply)]


def read_stream_entries(reply: Any) -> list[tuple[str, str, dict[Any, Any]]]:
    """``(stream, entry_id, fields)`` of an XREAD reply over one or more streams, stream by
    stream (see :func:`read_entries`)."""
    if not reply:
        return []
    streams = reply.items() if isinstance(reply, dict) else ((s[0], s[1]) for s in reply)
    out: list[tuple[str, str, dict[Any, Any]]] = []
    for stream, entries in streams:
        name = text(stream)
        for entry_id, fields in entries:
            if isinstance(fields, list):
                fields = dict(zip(fields[::2], fields[1::2], strict=True))
            out.append((name, text(entry_id), dict(fields) if fields else {}))
    return out


def id_order(entry_id: str) -> tuple[int, int]:
    """A stream id as a sort key: ids of different streams of one Redis compare by time."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def preview(fields: dict[bytes, bytes]) -> str:
    """The first KiB of an entry, for ``command.rejected``'s ``raw``: enough to recognise it."""
    if len(fields) == 1 and CMD_FIELD.encode() in fields:
        raw = fields[CMD_FIELD.encode()]
    else:
        raw = b" ".join(k + b"=" + v for k, v in fields.items())
    return raw[:RAW_PREVIEW_BYTES].decode("utf-8", "replace")
