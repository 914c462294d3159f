"""Command and event schemas: validation messages name the field; events round-trip."""

from __future__ import annotations

import re
import time
import uuid

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugind.messages import (
    ErrorInfo,
    EventFactory,
    InstallCommand,
    PackageRef,
    TaskCommand,
    TaskFailed,
    TaskResult,
    TaskSucceeded,
    decode_command,
    decode_event,
    encode,
    is_terminal,
    new_event_id,
)


def test_a_task_command_with_extra_fields_decodes() -> None:
    cmd = decode_command(
        b'{"type":"task","request_id":"r","plugin_id":"a/b","access":"tool",'
        b'"action":"invoke_tool","payload":{"x":1},"future_field":true}'
    )
    assert isinstance(cmd, TaskCommand)
    assert cmd.tenant_id == "default" and cmd.payload == {"x": 1} and not cmd.stream


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"type":"task","request_id":"r","access":"t","action":"a"}', "`plugin_id`"),
        (b'{"type":"nope","request_id":"r"}', "$.type"),
        (b'{"type":"install","request_id":"r","package":{}}', "exactly one of"),
        (
            b'{"type":"install","request_id":"r","package":{"path":"a","base64":"b"}}',
            "got path, base64",
        ),
        (
            b'{"type":"task","request_id":"","plugin_id":"a/b","access":"t","action":"a"}',
            "$.request_id",
        ),
        (
            b'{"type":"task","request_id":"r","plugin_id":"a/b","access":"t","action":"a",'
            b'"timeout_s":-1}',
            "$.timeout_s",
        ),
        (b"[1,2]", "Expected `object`"),
    ],
)
def test_bad_commands_say_what_is_wrong(raw: bytes, says: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=re.escape(says)):
        decode_command(raw)


def test_request_ids_are_bounded() -> None:
    cmd = InstallCommand(request_id="r" * 129, package=PackageRef(path="x"))
    with pytest.raises(msgspec.ValidationError, match="request_id"):
        decode_command(encode(cmd))


@given(
    request_id=st.text(min_size=1, max_size=128),
    chunks=st.lists(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5))),
    duration=st.floats(min_value=0, max_value=1e9, allow_nan=False),
)
def test_events_round_trip(
    request_id: str, chunks: list[dict[str, object]], duration: float
) -> None:
    make = EventFactory("node-1")
    event = make(
        TaskSucceeded,
        request_id=request_id,
        tenant_id="t",
        plugin_id="a/b",
        result=TaskResult(chunks=list(chunks)),
        duration_ms=duration,
    )
    back = decode_event(encode(event))
    assert back == event and is_terminal(back)
    assert back.at.endswith("Z") and back.node == "node-1"


def test_error_info_omits_what_the_plugin_did_not_say() -> None:
    event = EventFactory("n")(
        TaskFailed,
        request_id="r",
        tenant_id="t",
        plugin_id="a/b",
        error=ErrorInfo("timeout", "too slow"),
        duration_ms=1.0,
    )
    assert b'"error":{"code":"timeout","message":"too slow"}' in encode(event)


def test_event_ids_are_uuid7_ordered_by_time() -> None:
    first = new_event_id()
    time.sleep(0.002)
    later = [new_event_id() for _ in range(100)]
    for value in [first, *later]:
        parsed = uuid.UUID(value)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == value
    assert len(set(later)) == 100
    assert all(first[:13] < value[:13] for value in later)  # later milliseconds sort later
    stamp = int(first.replace("-", "")[:12], 16) / 1000
    assert abs(stamp - time.time()) < 5
