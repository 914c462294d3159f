"""Benchmark: plugins calling back into Dify, and plugin endpoints answering HTTP.

Starts ``plugind serve`` with the worker, projector and api roles as processes of their own (on
the Redis and Postgres given by ``REDIS_URL`` / ``DATABASE_URL``, else the local ones), pointed
at a fake of Dify's inner API served by this script (a bare ASGI app that answers every LLM call
at once with two length-prefixed frames), installs a bench plugin for one tenant, and measures

1. backwards call overhead: inside the plugin, the time from ``self.session.model.llm.invoke``
   (the ``invoke`` line leaving the plugin) to its first ``backwards_response`` (the first
   chunk), ``--calls`` calls one after another in one task; the same for a storage ``get``,
   which plugind answers itself (no Dify);
2. endpoint requests/s: ``GET /e/{hook_id}/ping`` of a trivial endpoint (answers ``pong``) from
   ``--concurrency`` clients for ``--seconds``, with the latency of each request.

Each run uses a fresh namespace and database, dropped afterwards.

    python bench/backwards.py --calls 1000 --concurrency 16 --seconds 10
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis
import uvicorn

from plugind.backwards.frames import encode_frame
from plugind.bus.keys import Keys
from plugind.client import Client
from plugind.messages import TaskCommand, TaskSucceeded
from plugind.package.difypkg import build_package

REPO = Path(__file__).resolve().parent.parent
TENANT = "bench-tenant"
KEY = "bench-key"
INNER_KEY = "bench-inner-key"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, values_ms: list[float]) -> str:
    return (
        f"{name}: n={len(values_ms)} p50 {percentile(values_ms, 0.5):.2f} ms,"
        f" p99 {percentile(values_ms, 0.99):.2f} ms, mean {statistics.fmean(values_ms):.2f} ms,"
        f" max {max(values_ms):.2f} ms"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# the fake inner API: every LLM call answered at once


def _chunk(index: int, word: str, last: bool) -> bytes:
    delta = {
        "index": index,
        "message": {"role": "assistant", "content": word, "tool_calls": []},
        "usage": None,
        "finish_reason": "stop" if last else None,
    }
    data = {"model": "m1", "prompt_messages": [], "system_fingerprint": None, "delta": delta}
    return encode_frame(orjson.dumps({"data": data, "error": ""}))


LLM_ANSWER = _chunk(0, "pong", False) + _chunk(1, "", True)


async def fake_inner_api(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:  # read the request to its end
        message = await receive()
        more = message.get("more_body", False)
    headers = dict(scope["headers"])
    if headers.get(b"x-inner-api-key") != INNER_KEY.encode():
        status, body = 404, b"not found"
    elif scope["path"] == "/inner/api/invoke/llm":
        status, body = 200, LLM_ANSWER
    else:
        status, body = 200, orjson.dumps({"data": None, "error": f"no fake for {scope['path']}"})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------
# the bench plugin

FILES = {
    "manifest.yaml": """\
        version: 0.1.0
        type: plugin
        author: bench
        name: callback
        label:
          en_US: callback
        description:
          en_US: Calls back into Dify in a loop, and a trivial endpoint.
        icon: icon.svg
        created_at: "2025-01-01T00:00:00Z"
        resource:
          memory: 268435456
          permission:
            model:
              enabled: true
              llm: true
            storage:
              enabled: true
              size: 1048576
            endpoint:
              enabled: true
        plugins:
          tools:
            - provider/callback.yaml
          endpoints:
            - group/callback.yaml
        meta:
          version: 0.0.1
          arch: [amd64, arm64]
          runner:
            language: python
            version: "3.12"
            entrypoint: main
        """,
    "main.py": """\
        from dify_plugin import DifyPluginEnv, Plugin

        plugin = Plugin(DifyPluginEnv())

        if __name__ == "__main__":
            plugin.run()
        """,
    "requirements.txt": "dify-plugin==0.10.2\n",
    "_assets/icon.svg": '<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"/>\n',
    "provider/callback.yaml": """\
        identity:
          author: bench
          name: callback
          label:
            en_US: callback
          description:
            en_US: Backwards calls in a loop.
          icon: icon.svg
        tools:
          - tools/loop.yaml
        extra:
          python:
            source: provider/callback.py
        """,
    "provider/callback.py": """\
        from dify_plugin import ToolProvider


        class CallbackProvider(ToolProvider):
            def _validate_credentials(self, credentials):
                pass
        """,
    "tools/loop.yaml": """\
        identity:
          name: loop
          author: bench
          label:
            en_US: loop
        description:
          human:
            en_US: loop
          llm: loop
        parameters: []
        extra:
          python:
            source: tools/loop.py
        """,
    "tools/loop.py": """\
        import time

        from dify_plugin import Tool
        from dify_plugin.entities.model.llm import LLMModelConfig
        from dify_plugin.entities.model.message import UserPromptMessage


        class LoopTool(Tool):
            def _invoke(self, tool_parameters):
                calls = int(tool_parameters.get("calls", 100))
                config = LLMModelConfig(
                    provider="bench/fake/fake", model="m1", mode="chat", completion_params={}
                )
                prompt = [UserPromptMessage(content="ping")]
                llm = []
                for _ in range(calls):
                    started = time.perf_counter()
                    chunks = self.session.model.llm.invoke(
                        model_config=config, prompt_messages=prompt, stream=True
                    )
                    next(chunks)
                    llm.append((time.perf_counter() - started) * 1000)
                    for _chunk in chunks:
                        pass
                self.session.storage.set("bench", b"x" * 64)
                storage = []
                for _ in range(calls):
                    started = time.perf_counter()
                    self.session.storage.get("bench")
                    storage.append((time.perf_counter() - started) * 1000)
                yield self.create_json_message({"llm": llm, "storage": storage})
        """,
    "group/callback.yaml": """\
        settings: []
        endpoints:
          - endpoints/ping.yaml
        """,
    "endpoints/ping.yaml": """\
        path: "/ping"
        method: "GET"
        extra:
          python:
            source: endpoints/ping.py
        """,
    "endpoints/ping.py": """\
        from werkzeug import Request, Response

        from dify_plugin import Endpoint


        class PingEndpoint(Endpoint):
            def _invoke(self, r: Request, values, settings) -> Response:
                return Response("pong", status=200, content_type="text/plain")
        """,
}


def write_plugin(dest: Path) -> Path:
    for name, text in FILES.items():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return dest


# --------------------------------------------------------------------------------------------


async def endpoint_load(
    http: httpx.AsyncClient, url: str, concurrency: int, seconds: float
) -> tuple[list[float], int]:
    """``concurrency`` clients calling ``url`` in a loop: their latencies, and the failures."""
    latencies: list[float] = []
    failures = 0
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal failures
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            response = await http.get(url)
            if response.status_code == 200 and response.content == b"pong":
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                failures += 1

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(client)
    return latencies, failures


async def main(args: argparse.Namespace) -> None:
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    dbname = namespace.replace("-", "_")
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    database_url = admin_url.rsplit("/", 1)[0] + "/" + dbname
    port, inner_port = free_port(), free_port()
    inner = uvicorn.Server(
        uvicorn.Config(
            fake_inner_api,
            host="127.0.0.1",
            port=inner_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        PLUGIND_NAMESPACE=namespace,
        PLUGIND_API_KEY=KEY,
        PLUGIN_WORKER_COUNT=str(args.workers),
        PLUGIN_DIR=str(REPO / ".plugind" / "bench-plugins"),
        PLUGIND_HTTP_PORT=str(port),
        PLUGIND_HTTP_HOST="127.0.0.1",
        DIFY_INNER_API_URL=f"http://127.0.0.1:{inner_port}",
        DIFY_INNER_API_KEY=INNER_KEY,
        LOG_LEVEL="WARN",
    )
    daemons = [
        subprocess.Popen(  # noqa: ASYNC220 - started once, before any async work
            [sys.executable, "-m", "plugind.cli", "serve", "--role", role], env=env
        )
        for role in ("worker", "projector", "api")
    ]
    redis = aioredis.Redis.from_url(redis_url)
    keys = Keys(namespace)
    client = Client(redis, keys)
    limits = httpx.Limits(max_keepalive_connections=100, max_connections=100)
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60, trust_env=False
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(inner.serve)
            with tempfile.TemporaryDirectory() as tmp:
                package = build_package(write_plugin(Path(tmp) / "callback"))
            event = await client.wait(await client.install(package, tenant_id=TENANT), 600)
            identifier = getattr(event, "identifier", None)
            print(f"installed: {identifier or event}")
            with anyio.fail_after(60):
                while True:
                    try:
                        if (await http.get("/health/check")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.2)

            # 1. backwards calls, timed inside the plugin
            await _loop(client, 20)  # warm-up: the process, the connections
            timings = await _loop(client, args.calls)
            print(
                "backwards call, plugin invoke -> first backwards_response "
                f"({args.calls} in a row):"
            )
            print("  " + summary("llm through Dify (fake answers at once)", timings["llm"]))
            print("  " + summary("storage get (served by plugind)", timings["storage"]))

            # 2. a trivial endpoint under load
            headers = {"X-Api-Key": KEY, "Content-Type": "application/json"}
            setup = await http.post(
                f"/plugin/{TENANT}/endpoint/setup",
                headers=headers,
                json={
                    "user_id": "bench",
                    "plugin_unique_identifier": identifier,
                    "settings": {},
                    "name": "ping",
                },
            )
            assert setup.json()["data"] is True, setup.text
            listed = await http.get(
                f"/plugin/{TENANT}/endpoint/list",
                params={"page": 1, "page_size": 10},
                headers=headers,
            )
            hook_id = listed.json()["data"][0]["hook_id"]
            url = f"/e/{hook_id}/ping"
            await endpoint_load(http, url, args.concurrency, 2.0)  # warm-up
            latencies, failures = await endpoint_load(http, url, args.concurrency, args.seconds)
            rate = len(latencies) / args.seconds
            print(
                f"endpoint GET /e/{{hook}}/ping, {args.concurrency} clients for "
                f"{args.seconds:g}s: {rate:.0f} requests/s, {failures} failed"
            )
            print("  " + summary("latency", latencies))
            inner.should_exit = True
    finally:
        await http.aclose()
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            daemon.wait(30)
        async for key in redis.scan_iter(match="{" + namespace + "}*"):
            await redis.delete(key)
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


async def _loop(client: Client, calls: int) -> dict[str, list[float]]:
    command = TaskCommand(
        request_id=f"bench-{uuid.uuid4()}",
        tenant_id=TENANT,
        plugin_id="bench/callback",
        access="tool",
        action="invoke_tool",
        user_id="bench",
        payload={
            "provider": "callback",
            "tool": "loop",
            "tool_parameters": {"calls": calls},
            "credentials": {},
        },
        timeout_s=600,
    )
    await client.send(command)
    event = await client.wait(command.request_id, timeout=600)
    if not isinstance(event, TaskSucceeded):
        raise RuntimeError(f"the loop failed: {event!r}")
    [chunk] = [c for c in event.result.chunks if c["type"] == "json"]
    result: dict[str, list[float]] = chunk["message"]["json_object"]
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000, help="backwards calls timed")
    parser.add_argument("--concurrency", type=int, default=16, help="endpoint clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="endpoint load duration")
    parser.add_argument("--workers", type=int, default=64, help="PLUGIN_WORKER_COUNT")
    anyio.run(main, parser.parse_args())
