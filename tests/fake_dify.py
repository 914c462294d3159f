"""A fake of Dify's inner API, as a real HTTP server (Starlette on uvicorn, a free port).

It behaves as dify-api does where plugind can tell: ``tenant_id`` and ``user_id`` are checked
first (HTTP 500 without a tenant), then ``X-Inner-Api-Key`` (HTTP 404 when wrong); streamed
answers (llm, tool, app, tts) are length-prefixed frames, the others one JSON document, each
item ``{"data", "error"}``. Every request is recorded, refused ones included, so a test can
say what reached Dify and what did not.

Knobs: ``llm_words`` and ``frame_delay`` (seconds between LLM frames), ``delay`` (before any
answer: a slow Dify), ``fail`` (a path whose answer is an error item), and :meth:`stop` /
:meth:`start` on the same port (a Dify that is down for a while).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
import uvicorn
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from plugind.backwards.frames import encode_frame

KEY = "inner-key"


@dataclass
class Received:
    path: str
    key: str | None
    body: dict[str, Any]


def _frame(data: Any = None, error: str = "") -> bytes:
    return encode_frame(orjson.dumps({"data": data, "error": error}))


def llm_chunk(model: str, index: int, word: str, *, last: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "prompt_messages": [],
        "system_fingerprint": None,
        "delta": {
            "index": index,
            "message": {"role": "assistant", "content": word, "tool_calls": []},
            "usage": None,
            "finish_reason": "stop" if last else None,
        },
    }


def _encrypt(value: Any) -> Any:
    return f"enc:{value[::-1]}" if isinstance(value, str) else value


def _decrypt(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("enc:"):
        return value[4:][::-1]
    return value


@dataclass
class FakeDify:
    key: str = KEY
    llm_words: list[str] = field(default_factory=lambda: ["The", " answer", " is", " 42."])
    frame_delay: float = 0.0
    delay: float = 0.0
    fail: dict[str, str] = field(default_factory=dict)  # path -> the error of its answer
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _server: uvicorn.Server | None = None
    _stopped: anyio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [r.path for r in self.received]

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/inner/api/{path:path}", self._handle, methods=["POST"])])

    async def _handle(self, request: Request) -> Response:
        path = request.path_params["path"]
        raw = await request.body()
        body = orjson.loads(raw) if raw else {}
        self.received.append(Received(path, request.headers.get("x-inner-api-key"), body))
        if not body.get("tenant_id"):
            return Response("tenant_id is required", status_code=500)
        if request.headers.get("x-inner-api-key") != self.key:
            return Response("not found", status_code=404)
        if self.delay:
            await anyio.sleep(self.delay)
        if path in self.fail:
            return Response(_frame(error=self.fail[path]), media_type="text/event-stream")
        if path == "invoke/llm":
            return StreamingResponse(self._llm(body), media_type="text/event-stream")
        if path == "invoke/tool":
            return StreamingResponse(self._tool(body), media_type="text/event-stream")
        if path == "invoke/text-embedding":
            texts = body.get("texts") or []
            data = {
                "model": body.get("model"),
                "embeddings": [[float(len(t)), 0.5] for t in texts],
                "usage": {
                    "tokens": len(texts),
                    "total_tokens": len(texts),
                    "unit_price": "0",
                    "price_unit": "0",
                    "total_price": "0",
                    "currency": "USD",
                    "latency": 0.0,
                },
            }
            return Response(
                orjson.dumps({"data": data, "error": ""}), media_type="application/json"
            )
        if path == "fetch/app/info":
            info = {"data": {"id": body.get("app_id"), "mode": "chat"}}
            return Response(
                orjson.dumps({"data": info, "error": ""}), media_type="application/json"
            )
        if path == "invoke/encrypt":
            return self._encryption(body)
        return Response(orjson.dumps({"data": None, "error": f"no fake for {path}"}))

    async def _llm(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        model = str(body.get("model"))
        for index, word in enumerate(self.llm_words):
            if index and self.frame_delay:
                await anyio.sleep(self.frame_delay)
            last = index == len(self.llm_words) - 1
            yield _frame(llm_chunk(model, index, word, last=last))

    async def _tool(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        name = f"{body.get('provider')}/{body.get('tool')}"
        yield _frame({"type": "text", "message": {"text": f"{name} ran"}, "meta": None})
        params = body.get("tool_parameters") or {}
        yield _frame({"type": "json", "message": {"json_object": {"got": params}}, "meta": None})

    def _encryption(self, body: dict[str, Any]) -> Response:
        opt, data = body.get("opt"), body.get("data") or {}
        secret = {
            c.get("name") for c in body.get("config") or [] if c.get("type") == "secret-input"
        }
        if opt == "encrypt":
            out = {k: _encrypt(v) if k in secret else v for k, v in data.items()}
        elif opt == "decrypt":
            out = {k: _decrypt(v) if k in secret else v for k, v in data.items()}
        else:
            out = {}
        return Response(orjson.dumps({"data": {"data": out}, "error": ""}))

    # -- life ----------------------------------------------------------------------------------

    async def start(self, tg: TaskGroup) -> None:
        """Serve (on the same port as before, after a :meth:`stop`)."""
        if not self.port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        config = uvicorn.Config(
            self.app(),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        server = _Server(config)
        self._server, self._stopped = server, anyio.Event()
        tg.start_soon(self._serve, server, self._stopped)
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)

    @staticmethod
    async def _serve(server: uvicorn.Server, stopped: anyio.Event) -> None:
        try:
            await server.serve()
        finally:
            stopped.set()

    async def stop(self) -> None:
        """Stop serving: the port refuses connections until :meth:`start`."""
        server, stopped = self._server, self._stopped
        if server is None or stopped is None:
            return
        server.should_exit = True
        with anyio.fail_after(10):
            await stopped.wait()
        self._server = None


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def fake_dify(**options: Any) -> AsyncIterator[FakeDify]:
    """A running fake for the block."""
    async with anyio.create_task_group() as tg:
        fake = FakeDify(**options)
        await fake.start(tg)
        try:
            yield fake
        finally:
            await fake.stop()
