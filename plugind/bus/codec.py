"""How commands and events sit in stream entries: one field holding JSON.

One JSON field (``cmd`` or ``event``) rather than a flat hash keeps nested payloads intact and
lets any language produce with a plain XADD.
"""

from __future__ import annotations

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
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def preview(fields: dict[bytes, bytes]) -> str:
    """The first KiB of an entry, for ``command.rejected``'s ``raw``: enough to recognise it."""
    if len(fields) == 1 and CMD_FIELD.encode() in fields:
        raw = fields[CMD_FIELD.encode()]
    else:
        raw = b" ".join(k + b"=" + v for k, v in fields.items())
    return raw[:RAW_PREVIEW_BYTES].decode("utf-8", "replace")
