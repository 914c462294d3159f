"""The stdio line codec (plugind/runtime/protocol.py), against lines observed from the real SDK."""

from __future__ import annotations

import orjson
import pytest

from plugind.errors import PlugindError
from plugind.runtime.protocol import (
    Chunk,
    Declaration,
    End,
    Garbage,
    Heartbeat,
    Invoke,
    LineSplitter,
    Log,
    Oversized,
    PluginRequest,
    SessionError,
    StreamError,
    decode_line,
    encode_backwards_error,
    encode_request,
)


def test_request_line_has_difys_shape() -> None:
    request = PluginRequest(
        access="tool",
        action="invoke_tool",
        payload={
            "provider": "calc",
            "tool": "add",
            "tool_parameters": {"a": 2, "b": 3},
            "credentials": {},
        },
        user_id="u1",
    )
    line = encode_request("3888e227-d330-4542-86ad-cca443f244e5", request)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == {
        "session_id": "3888e227-d330-4542-86ad-cca443f244e5",
        "conversation_id": None,
        "message_id": None,
        "app_id": None,
        "endpoint_id": None,
        "context": None,
        "event": "request",
        "data": {
            "action": "invoke_tool",
            "credentials": {},
            "provider": "calc",
            "tool": "add",
            "tool_parameters": {"a": 2, "b": 3},
            "type": "tool",
            "user_id": "u1",
        },
    }


def test_request_route_comes_from_the_request_not_the_payload() -> None:
    request = PluginRequest(
        "tool",
        "invoke_tool",
        {"type": "model", "action": "x", "user_id": "p"},
        app_id="app",
        context={"k": 1},
    )
    line = orjson.loads(encode_request("s", request))
    assert line["data"] == {"type": "tool", "action": "invoke_tool", "user_id": "p"}
    assert line["app_id"] == "app" and line["context"] == {"k": 1}
    explicit = orjson.loads(encode_request("s", PluginRequest("tool", "a", {"user_id": "p"}, "u")))
    assert explicit["data"]["user_id"] == "u"


def test_unencodable_payload_is_a_clear_error() -> None:
    with pytest.raises(PlugindError) as caught:
        encode_request("s", PluginRequest("tool", "a", {"x": object()}))
    assert caught.value.code == "malformed_command"


def test_backwards_error_answer() -> None:
    line = orjson.loads(encode_backwards_error("s1", "b1", "no"))
    assert line == {
        "session_id": "s1",
        "event": "backwards_response",
        "data": {"backwards_request_id": "b1", "event": "error", "message": "no", "data": None},
    }


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            b'{"version":"0.1.0","type":"plugin","author":"acme","name":"calc"}',
            Declaration({"version": "0.1.0", "type": "plugin", "author": "acme", "name": "calc"}),
        ),
        (
            b'{"event": "log", "data": {"level": "INFO", "message": "Installed tool: calc", '
            b'"timestamp": 1.5}}',
            Log("INFO", "Installed tool: calc"),
        ),
        (b'{"event":"heartbeat","session_id":null,"data":{}}', Heartbeat()),
        (b'{"event":"session","session_id":"S","data":{"type":"end","data":{}}}', End("S")),
        (
            b'{"event":"session","session_id":"S","data":{"type":"error","data":{"error_type":'
            b'"KeyError","message":"\'b\'","args":{"traceback":"tb"}}}}',
            SessionError("S", "KeyError", "'b'", {"traceback": "tb"}),
        ),
        (
            b'{"event":"session","session_id":"S","data":{"type":"invoke","data":{"type":"llm"}}}',
            Invoke("S", {"type": "llm"}),
        ),
        (
            b'{"event":"error","session_id":null,"data":{"error":"\'session_id\'"}}',
            StreamError("'session_id'"),
        ),
        (b"hello from print()", Garbage("hello from print()")),
        (b"[1, 2]", Garbage("[1, 2]")),
        (b'{"event":"bogus"}', Garbage('{"event":"bogus"}')),
    ],
)
def test_decode_line(line: bytes, expected: object) -> None:
    assert decode_line(line) == expected


def test_decode_stream_chunk_carries_its_size() -> None:
    line = (
        b'{"event":"session","session_id":"S","data":{"type":"stream","data":'
        b'{"type":"text","message":{"text":"5"},"meta":null}}}'
    )
    assert decode_line(line) == Chunk(
        "S", {"type": "text", "message": {"text": "5"}, "meta": None}, len(line)
    )


def test_splitter_joins_pieces_and_skips_empty_lines() -> None:
    splitter = LineSplitter(max_line=1024)
    assert splitter.feed(b'{"a":') == []
    assert splitter.feed(b'1}\n\n{"b":2}\n') == [b'{"a":1}', b'{"b":2}']
    assert splitter.feed(b"\n \n") == []
    assert splitter.feed(b'{"c":3}') == []
    assert splitter.flush() == [b'{"c":3}']
    assert splitter.flush() == []


def test_splitter_handles_a_6_mib_line_in_small_reads() -> None:
    text = "x" * (6 * 1024 * 1024)
    line = orjson.dumps(
        {
            "event": "session",
            "session_id": "S",
            "data": {"type": "stream", "data": {"message": {"text": text}}},
        }
    )
    splitter = LineSplitter(max_line=8 * 1024 * 1024)
    out: list[object] = []
    data = line + b"\n\n" + b'{"event":"heartbeat","session_id":null,"data":{}}\n'
    for start in range(0, len(data), 65536):
        out += splitter.feed(data[start : start + 65536])
    assert out[0] == line and len(out) == 2
    message = decode_line(line)
    assert isinstance(message, Chunk) and message.data["message"]["text"] == text


def test_splitter_drops_an_oversized_line_and_names_its_session() -> None:
    splitter = LineSplitter(max_line=1000)
    head = b'{"event":"session","session_id":"big-1","data":{"type":"stream","data":"'
    out = splitter.feed(head + b"y" * 600)
    assert out == []
    out = splitter.feed(b"y" * 600)
    assert out == [Oversized("big-1", len(head) + 1200)]
    assert splitter.feed(b"y" * 5000) == []  # still inside the dropped line
    assert splitter.feed(b'yy"}}\n{"event":"heartbeat"}\n') == [b'{"event":"heartbeat"}']
    # A complete oversized line in one read is reported the same way.
    whole = head + b"z" * 2000 + b'"}}\n'
    assert splitter.feed(whole) == [Oversized("big-1", len(whole) - 1)]
