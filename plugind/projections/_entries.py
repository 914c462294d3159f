"""Turn raw ``{ns}:events`` entries into rows for ``event_log``: pure, no I/O.

An entry that is not a valid event still becomes a row (type ``unknown``) so positions stay
gap-free and the audit sees it; only the projector decides what to do with the row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import orjson

from plugind.bus.codec import EVENT_FIELD, RAW_PREVIEW_BYTES, field, text
from plugind.messages import AnyEvent, decode_event, event_type
from plugind.projections.read_models import parse_at, short_plugin_id

UNKNOWN_TYPE: Final = "unknown"
RAW_LIMIT: Final = RAW_PREVIEW_BYTES


def stream_id_key(stream_id: str) -> tuple[int, int]:
    """A stream id as a sortable ``(ms, seq)``: ids compare numerically, not as text."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def stream_id_time(stream_id: str) -> datetime:
    return datetime.fromtimestamp(stream_id_key(stream_id)[0] / 1000, UTC)


@dataclass(slots=True)
class LogEntry:
    """One stream entry decoded for the log: ``event`` is None for an ``unknown`` row."""

    stream_id: str
    type: str
    payload: str  # JSON text
    event: AnyEvent | None
    event_id: str | None
    request_id: str | None
    tenant_id: str | None
    plugin_id: str | None
    at: datetime
    error: str | None = None  # why it is unknown
    # ``canonical(payload)`` when it is also the canonical form of the text Postgres hands back
    # for the stored jsonb (see :func:`jsonb_canonical`); None: ask Postgres to normalise it.
    canonical: bytes | None = None


def jsonb_canonical(raw: bytes, obj: Any) -> bytes | None:
    """The chain's canonical bytes of ``raw`` (parsed: ``obj``), if computing them here gives
    what computing them from Postgres's text of the stored jsonb would; else None.

    ``raw`` must be exactly orjson's compact serialisation of ``obj`` (so every number in it is
    written as orjson writes it, and no key repeats), with no float that jsonb writes otherwise:
    one orjson writes with an exponent (jsonb expands ``1e+16`` to ``10000000000000000``, an
    integer once parsed again) or a negative zero (jsonb has none). Then Postgres's text parses
    back to ``obj``, and both sides hash ``orjson.dumps(obj, OPT_SORT_KEYS)``. Events as plugind
    writes them pass, and skip the normalising round trip to Postgres.
    """
    if orjson.dumps(obj) != raw or _jsonb_rewrites_a_float(obj):
        return None
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _jsonb_rewrites_a_float(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is float and (
            b"e" in orjson.dumps(item) or (item == 0.0 and math.copysign(1.0, item) < 0)
        ):
            return True
    return False


def _scrub(value: Any) -> Any:
    """Replace NUL characters, which a jsonb value cannot hold, with U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


def _unknown(stream_id: str, raw: bytes, error: str, obj: Any = None) -> LogEntry:
    text = raw[:RAW_LIMIT].decode("utf-8", "replace").replace("\x00", "\ufffd")
    payload = orjson.dumps({"raw": text, "error": error}).decode()

    def pick(name: str) -> str | None:
        value = obj.get(name) if isinstance(obj, dict) else None
        return _scrub(value)[:512] if isinstance(value, str) else None

    plugin = pick("plugin_id")
    return LogEntry(
        stream_id=stream_id,
        type=UNKNOWN_TYPE,
        payload=payload,
        canonical=None,
        event=None,
        event_id=None,
        request_id=pick("request_id"),
        tenant_id=pick("tenant_id"),
        plugin_id=short_plugin_id(plugin) if plugin else None,
        at=stream_id_time(stream_id),
        error=error,
    )


def decode_entry(stream_id: str, fields: dict[Any, Any] | None) -> LogEntry:
    """Decode one entry's ``event`` field; never raises on bad input."""
    raw = field(fields, EVENT_FIELD)
    if raw is None:
        described = {text(k): text(v) for k, v in (fields or {}).items()}
        error = "entry has no `event` field" if fields else "entry was deleted from the stream"
        return _unknown(stream_id, orjson.dumps(described) if fields else b"", error)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _unknown(stream_id, raw, f"not valid JSON: {exc}")
    if b"\\u0000" in raw:
        obj = _scrub(obj)
        raw = orjson.dumps(obj)
    try:
        event = decode_event(raw)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        return _unknown(stream_id, raw, f"not a known event: {exc}", obj)
    plugin = getattr(event, "plugin_id", None)
    return LogEntry(
        stream_id=stream_id,
        type=event_type(event),
        payload=raw.decode(),
        event=event,
        event_id=event.event_id,
        request_id=event.request_id,
        tenant_id=event.tenant_id,
        plugin_id=short_plugin_id(plugin) if isinstance(plugin, str) and plugin else None,
        at=parse_at(event.at) or stream_id_time(stream_id),
        canonical=jsonb_canonical(raw, obj),
    )
