"""The dispatcher's decisions: which entries are commands, and how the others end.

Plain functions, no services: an entry without ``cmd``, an oversized one, bad JSON and a missing
field each become ``command.rejected`` filed under whatever request id could still be read; an
entry delivered too often becomes ``command.dead_lettered``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from plugind.bus.delivery import Delivery
from plugind.handlers.decide import (
    Refusal,
    best_effort_ids,
    dead_lettered,
    max_command_bytes,
    read_command,
    rejected,
)
from plugind.messages import ErrorInfo, EventFactory, TaskCommand, encode

AT = "2025-01-02T03:04:05.000006Z"
EVENTS = EventFactory("node-1", new_id=lambda: "event-1", now=lambda: AT)
COMMON = {"v": 1, "event_id": "event-1", "at": AT, "node": "node-1"}
TASK = b'{"type":"task","request_id":"r3","plugin_id":"acme/calc","access":"tool","action":"a"}'


def wire(event: Any) -> Any:
    return orjson.loads(encode(event))


def test_a_command_decodes() -> None:
    cmd = read_command({b"cmd": TASK}, 1024)
    assert isinstance(cmd, TaskCommand)
    assert (cmd.request_id, cmd.tenant_id, cmd.plugin_id) == ("r3", "default", "acme/calc")


def test_an_entry_without_cmd_names_its_fields() -> None:
    assert read_command({b"zeta": b"1", b"alpha": b"2"}, 1024) == Refusal(
        ErrorInfo("malformed_command", "entry has no `cmd` field (fields: alpha, zeta)")
    )
    assert read_command({}, 1024) == Refusal(
        ErrorInfo("malformed_command", "entry has no `cmd` field (fields: none)")
    )


def test_an_oversized_command_is_filed_under_its_ids_if_they_come_early() -> None:
    raw = b'{"request_id": "big", "tenant_id": "t9", "payload": "' + b"x" * 5000 + b'"}'
    assert read_command({b"cmd": raw}, 4096) == Refusal(
        ErrorInfo("payload_too_large", f"command is {len(raw)} bytes, over the 4096-byte limit"),
        "big",
        "t9",
    )


def test_a_missing_field_is_named() -> None:
    raw = b'{"type": "uninstall", "request_id": "r2", "tenant_id": "t1"}'
    assert read_command({b"cmd": raw}, 1024) == Refusal(
        ErrorInfo("malformed_command", "Object missing required field `plugin_id`"), "r2", "t1"
    )


@pytest.mark.parametrize(
    ("raw", "ids"),
    [
        (b'{"request_id": "r1", "tenant_id": "t1"}', ("r1", "t1")),
        (b'{"request_id": "r1"', ("r1", "default")),  # cut JSON: found by pattern
        (b'{"request_id": 7, "tenant_id": ""}', ("", "default")),  # unusable values
        (b'{"request_id": "' + b"x" * 129 + b'"}', ("", "default")),  # too long
        (b"[1, 2]", ("", "default")),
        (b"", ("", "default")),
    ],
)
def test_best_effort_ids(raw: bytes, ids: tuple[str, str]) -> None:
    assert best_effort_ids(raw) == ids


def test_the_command_limit_leaves_room_for_a_base64_package() -> None:
    assert max_command_bytes(3 * 1024 * 1024) == 4 * 1024 * 1024 + 64 * 1024


def test_rejected() -> None:
    delivery = Delivery("{plugind}:tasks", "17-0", {b"cmd": b"{oops"})
    error = ErrorInfo("malformed_command", "JSON is malformed")
    done = rejected(EVENTS, delivery, error, request_id="r5", tenant_id="t5")
    assert wire(done.event) == {
        "type": "command.rejected",
        **COMMON,
        "request_id": "r5",
        "tenant_id": "t5",
        "stream": "{plugind}:tasks",
        "entry_id": "17-0",
        "error": {"code": "malformed_command", "message": "JSON is malformed"},
        "raw": "{oops",
    }
    assert done.registry is None and done.retire is None and done.always_log
    (line,) = done.logs
    assert (line.level, line.render()) == (
        logging.WARNING,
        "Command rejected: {plugind}:tasks 17-0, request_id=r5, code=malformed_command, "
        "error=JSON is malformed",
    )
    anonymous = rejected(EVENTS, Delivery("{plugind}:tasks", "18-0", {b"x": b"1"}), error)
    assert wire(anonymous.event)["request_id"] == ""
    assert wire(anonymous.event)["tenant_id"] == "default"
    assert wire(anonymous.event)["raw"] == "x=1"
    assert "request_id=-," in anonymous.logs[0].render()


def test_dead_lettered() -> None:
    delivery = Delivery("{plugind}:tasks", "17-0", {b"cmd": TASK}, deliveries=5)
    done = dead_lettered(EVENTS, delivery)
    assert wire(done.event) == {
        "type": "command.dead_lettered",
        **COMMON,
        "request_id": "r3",
        "tenant_id": "default",
        "stream": "{plugind}:tasks",
        "entry_id": "17-0",
        "deliveries": 5,
        "error": {
            "code": "max_deliveries_exceeded",
            "message": "delivered 5 times without finishing; moved to dead letters",
        },
    }
    assert done.always_log
    (line,) = done.logs
    assert (line.level, line.render()) == (
        logging.ERROR,
        "Command dead-lettered: {plugind}:tasks 17-0, request_id=r3, deliveries=5",
    )
    anonymous = dead_lettered(EVENTS, Delivery("{plugind}:tasks", "18-0", {}, deliveries=5))
    assert wire(anonymous.event)["request_id"] == ""
    assert "request_id=-," in anonymous.logs[0].render()
