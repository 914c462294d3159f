"""The task handler's decisions: from what the plugin gave to the terminal event, field by field.

Plain functions, no services: each outcome a task can have (chunks, a plugin error, a timeout,
a crash, a result over the cap, a plugin that is not installed) is pinned as it goes on the wire,
with its log lines.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from plugind.errors import PlainCode, PlugindError, TimedOut
from plugind.handlers.decide import (
    LogLine,
    backwards_invoked,
    caller,
    plugin_request,
    task_ended,
    task_started,
    task_timeout,
)
from plugind.messages import EventFactory, TaskCommand, encode
from plugind.runtime.backwards import BackwardsOutcome, Caller
from plugind.runtime.protocol import PluginRequest

AT = "2025-01-02T03:04:05.000006Z"
EVENTS = EventFactory("node-1", new_id=lambda: "event-1", now=lambda: AT)
COMMON = {"v": 1, "event_id": "event-1", "at": AT, "node": "node-1"}
IDENTIFIER = f"acme/calc:0.1.0@{'c' * 64}"
PAYLOAD = {"provider": "calc", "tool": "add", "tool_parameters": {"a": 1, "b": 2}}
CHUNKS = [
    {"type": "json", "message": {"json_object": {"sum": 3}}, "meta": None},
    {"type": "text", "message": {"text": "3"}, "meta": None},
]
EXECUTED = "Plugin task executed: %s, request_id=%s, duration=%.3fs, status=%s"


def command(**changes: Any) -> TaskCommand:
    fields: dict[str, Any] = {
        "request_id": "r3",
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "access": "tool",
        "action": "invoke_tool",
        "payload": PAYLOAD,
        "user_id": "u1",
        "timeout_s": 30.0,
    }
    return TaskCommand(**(fields | changes))


def wire(event: Any) -> Any:
    return orjson.loads(encode(event))


def end(outcome: list[Any] | PlugindError, plugin_id: str = "acme/calc") -> Any:
    return task_ended(
        EVENTS, command(), outcome, plugin_id=plugin_id, timeout_s=30.0, duration_ms=54.321
    )


def test_started() -> None:
    event = task_started(EVENTS, command(), plugin_id="acme/calc", identifier=IDENTIFIER, attempt=2)
    assert wire(event) == {
        "type": "task.started",
        **COMMON,
        "request_id": "r3",
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "identifier": IDENTIFIER,
        "access": "tool",
        "action": "invoke_tool",
        "attempt": 2,
    }


def test_chunks_are_a_success() -> None:
    ended = end(CHUNKS)
    assert wire(ended.event) == {
        "type": "task.succeeded",
        **COMMON,
        "request_id": "r3",
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "result": {"chunks": CHUNKS},
        "duration_ms": 54.321,
    }
    assert ended.logs == (
        LogLine(logging.INFO, EXECUTED, ("acme/calc", "r3", 0.054321, "success")),
    )
    assert ended.logs[0].render() == (
        "Plugin task executed: acme/calc, request_id=r3, duration=0.054s, status=success"
    )
    assert ended.registry is None and ended.retire is None and not ended.always_log


def test_no_chunks_is_a_success_too() -> None:
    assert wire(end([]).event)["result"] == {"chunks": []}


def test_a_plugin_error_keeps_its_type_and_args() -> None:
    error = PlugindError(
        "plugin_error",
        "cannot divide 2 by zero",
        error_type="ZeroDivisionError",
        args={"traceback": "Traceback (most recent call last): ..."},
    )
    ended = end(error)
    assert wire(ended.event) == {
        "type": "task.failed",
        **COMMON,
        "request_id": "r3",
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "error": {
            "code": "plugin_error",
            "message": "cannot divide 2 by zero",
            "error_type": "ZeroDivisionError",
            "args": {"traceback": "Traceback (most recent call last): ..."},
        },
        "duration_ms": 54.321,
    }
    assert [(line.level, line.render()) for line in ended.logs] == [
        (
            logging.WARNING,
            "Plugin task failed: acme/calc, request_id=r3, code=plugin_error, "
            "error=cannot divide 2 by zero",
        ),
        (
            logging.INFO,
            "Plugin task executed: acme/calc, request_id=r3, duration=0.054s, status=failed",
        ),
    ]
    assert ended.registry is None and ended.retire is None and not ended.always_log


def test_a_timeout_is_timed_out_with_the_timeout() -> None:
    ended = end(TimedOut("acme/calc did not answer within 30s"))
    assert wire(ended.event) == {
        "type": "task.timed_out",
        **COMMON,
        "request_id": "r3",
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "timeout_s": 30.0,
        "duration_ms": 54.321,
    }
    assert [(line.level, line.render()) for line in ended.logs] == [
        (logging.WARNING, "Plugin task timeout: acme/calc, request_id=r3, timeout=30s"),
        (
            logging.INFO,
            "Plugin task executed: acme/calc, request_id=r3, duration=0.054s, status=timeout",
        ),
    ]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("plugin_crashed", f"{IDENTIFIER} exited with status 3: crashy: calling os._exit(3)"),
        ("result_too_large", f"{IDENTIFIER} returned more than 16777216 bytes"),
        ("plugin_start_failed", f"{IDENTIFIER} exited before it was ready"),
    ],
)
def test_other_failures_are_failed_with_their_code(code: PlainCode, message: str) -> None:
    ended = end(PlugindError(code, message))
    assert wire(ended.event) == {
        "type": "task.failed",
        **COMMON,
        "request_id": "r3",
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "error": {"code": code, "message": message},
        "duration_ms": 54.321,
    }
    assert ended.logs[0] == LogLine(
        logging.WARNING,
        "Plugin task failed: %s, request_id=%s, code=%s, error=%s",
        ("acme/calc", "r3", code, message),
    )
    assert ended.logs[1].args[-1] == "failed"


def test_a_plugin_that_is_not_installed_is_named_as_the_command_named_it() -> None:
    error = PlugindError("not_installed", "plugin acme/nope is not installed for tenant t1")
    ended = end(error, plugin_id="acme/nope")
    assert wire(ended.event) == {
        "type": "task.failed",
        **COMMON,
        "request_id": "r3",
        "tenant_id": "t1",
        "plugin_id": "acme/nope",
        "error": {"code": "not_installed", "message": error.message},
        "duration_ms": 54.321,
    }


def test_the_timeout_is_the_commands_else_the_default() -> None:
    assert task_timeout(command(), 600.0) == 30.0
    assert task_timeout(command(timeout_s=None), 600.0) == 600.0


def test_the_plugin_gets_difys_fields_unchanged() -> None:
    cmd = command(
        conversation_id="c1",
        message_id="m1",
        app_id="a1",
        endpoint_id="e1",
        context={"trace": "x"},
        stream=True,
    )
    assert plugin_request(cmd) == PluginRequest(
        access="tool",
        action="invoke_tool",
        payload=PAYLOAD,
        user_id="u1",
        conversation_id="c1",
        message_id="m1",
        app_id="a1",
        endpoint_id="e1",
        context={"trace": "x"},
    )
    assert plugin_request(command(user_id="")) == PluginRequest("tool", "invoke_tool", PAYLOAD)


def test_a_backwards_call_as_it_goes_on_the_wire() -> None:
    who = caller(command(), plugin_id="acme/calc", identifier=IDENTIFIER)
    assert who == Caller("r3", "t1", "u1", "acme/calc", IDENTIFIER, "tool", "invoke_tool")
    ok = BackwardsOutcome("llm", "openai/gpt-4o", "ok", 12.5)
    event, line = backwards_invoked(EVENTS, command(), ok, plugin_id="acme/calc")
    assert wire(event) == {
        "type": "task.backwards_invoked",
        **COMMON,
        "request_id": "r3",
        "tenant_id": "t1",
        "plugin_id": "acme/calc",
        "kind": "llm",
        "target": "openai/gpt-4o",
        "outcome": "ok",
        "duration_ms": 12.5,
        "error": None,
    }
    assert line.level == logging.DEBUG
    denied = BackwardsOutcome("storage", "set", "denied", 0.2, "permission denied")
    event, line = backwards_invoked(EVENTS, command(), denied, plugin_id="acme/calc")
    assert wire(event)["error"] == "permission denied"
    assert line.level == logging.WARNING
    assert line.render() == (
        "Plugin backwards call: acme/calc storage set, request_id=r3, outcome=denied, "
        "duration=0.2ms, error=permission denied"
    )
