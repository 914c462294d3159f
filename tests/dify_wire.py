"""Talking to plugind the way dify-api talks to its plugin daemon, for the Dify contract tests.

The parsing rules are dify-api's (``api/core/plugin/impl/base.py``), restated here:

- every request carries ``X-Api-Key`` (and dispatches ``X-Plugin-ID`` and a JSON body with
  ``Content-Type: application/json``);
- a stream is read line by line: blank lines are skipped, a ``data:`` prefix is stripped, and
  every other line must be one JSON envelope ``{code, message, data}``;
- ``code 0`` with ``data`` null is an error; in a stream only ``code -500`` is mapped to a typed
  error (``message`` is the JSON of ``{error_type, message, args}``; ``PluginInvokeError`` nests
  the plugin's own ``{error_type, message}`` once more), any other code is a bare ``ValueError``.

:class:`DifyRaised` names the exception class dify-api would raise, so a test can assert on it.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

# The plugin errors dify-api re-raises as its own classes; any other becomes PluginInvokeError.
KNOWN_INVOKE_ERRORS = frozenset(
    {
        "InvokeRateLimitError",
        "InvokeAuthorizationError",
        "InvokeBadRequestError",
        "InvokeConnectionError",
        "InvokeServerUnavailableError",
        "CredentialsValidateFailedError",
        "EndpointSetupFailedError",
        "TriggerProviderCredentialValidationError",
        "TriggerPluginInvokeError",
        "TriggerInvokeError",
        "EventIgnoreError",
        "PluginLLMPollingUnsupportedError",
    }
)
DAEMON_ERRORS = frozenset(
    {
        "PluginDaemonInnerError",
        "PluginDaemonInternalServerError",
        "PluginDaemonBadRequestError",
        "PluginDaemonNotFoundError",
        "PluginUniqueIdentifierError",
        "PluginNotFoundError",
        "PluginDaemonUnauthorizedError",
        "PluginPermissionDeniedError",
    }
)


class DifyRaised(Exception):
    """What dify-api would raise: ``raised`` is its exception class name."""

    def __init__(self, raised: str, description: str, *, plugin_error_type: str | None = None):
        super().__init__(f"{raised}: {description}")
        self.raised = raised
        self.description = description
        self.plugin_error_type = plugin_error_type


def _typed_error(error_type: str, message: str) -> DifyRaised:
    if error_type == "PluginInvokeError":
        inner = json.loads(message)
        inner_type = inner.get("error_type")
        raised = inner_type if inner_type in KNOWN_INVOKE_ERRORS else "PluginInvokeError"
        description = inner.get("message") if raised != "PluginInvokeError" else message
        return DifyRaised(raised, str(description), plugin_error_type=inner_type)
    if error_type in DAEMON_ERRORS:
        return DifyRaised(error_type, message)
    return DifyRaised("Exception", f"got unknown error from plugin daemon: {error_type}")


def parse_envelope(line: str) -> dict[str, Any]:
    envelope = json.loads(line)
    assert isinstance(envelope, dict), line
    assert set(envelope) == {"code", "message", "data"}, envelope
    assert isinstance(envelope["code"], int) and isinstance(envelope["message"], str), envelope
    return envelope


def stream_data(lines: list[str]) -> list[Any]:
    """The ``data`` of each frame, with dify-api's rules; raises :class:`DifyRaised`."""
    out: list[Any] = []
    for raw in lines:
        if not raw:
            continue
        line = raw.strip()
        if line.startswith("data:"):
            line = line[5:].strip()
        if not line:
            continue
        envelope = parse_envelope(line)
        if envelope["code"] != 0:
            if envelope["code"] == -500:
                try:
                    error = json.loads(envelope["message"])
                except ValueError:
                    raise DifyRaised("PluginDaemonInnerError", envelope["message"]) from None
                raise _typed_error(error["error_type"], error["message"])
            raise DifyRaised("ValueError", f"{envelope['message']}, code: {envelope['code']}")
        if envelope["data"] is None:
            raise DifyRaised("ValueError", "got empty data from plugin daemon")
        out.append(envelope["data"])
    return out


def envelope_data(body: bytes) -> Any:
    """A plain (non-stream) answer, with dify-api's rules; raises :class:`DifyRaised`."""
    envelope = parse_envelope(body.decode())
    if envelope["code"] != 0:
        error = json.loads(envelope["message"])
        raise _typed_error(error["error_type"], error["message"])
    if envelope["data"] is None:
        raise DifyRaised("ValueError", "got empty data from plugin daemon")
    return envelope["data"]


@dataclass
class Frame:
    at: float  # monotonic seconds since the request was sent
    line: str


@dataclass
class StreamReply:
    status: int
    headers: httpx.Headers
    frames: list[Frame] = field(default_factory=list)
    raw: bytes = b""

    @property
    def lines(self) -> list[str]:
        return [frame.line for frame in self.frames]

    def data(self) -> list[Any]:
        return stream_data(self.lines)

    def raised(self) -> DifyRaised:
        """The error dify-api raises reading this stream (the test fails if it raises none)."""
        try:
            self.data()
        except DifyRaised as exc:
            return exc
        raise AssertionError(f"the stream ended without an error: {self.lines}")


class DifyApi:
    """A dify-api-like client of ``PLUGIN_DAEMON_URL``."""

    def __init__(self, base_url: str, key: str, *, timeout: float = 120) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            headers={"Accept-Encoding": "gzip, deflate, br"},
            trust_env=False,
        )
        self.key = key

    async def aclose(self) -> None:
        await self.http.aclose()

    def headers(self, plugin_id: str | None = None, **extra: str) -> dict[str, str]:
        headers = {"X-Api-Key": self.key, "Content-Type": "application/json", **extra}
        if plugin_id is not None:
            headers["X-Plugin-ID"] = plugin_id
        return headers

    async def dispatch(
        self,
        tenant: str,
        route: str,
        plugin_id: str | None,
        data: dict[str, Any] | None = None,
        *,
        user_id: str | None = "user-1",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> StreamReply:
        """POST a dispatch the way dify-api does and collect each frame with its arrival time."""
        if body is None:
            payload: dict[str, Any] = {"data": data if data is not None else {}}
            if user_id is not None:
                payload["user_id"] = user_id
            payload.update(context)
            body = json.dumps(payload).encode()
        return await self.post_stream(
            f"/plugin/{tenant}/dispatch/{route}",
            body,
            headers if headers is not None else self.headers(plugin_id),
        )

    async def post_stream(self, path: str, body: bytes, headers: dict[str, str]) -> StreamReply:
        started = time.monotonic()
        async with self.http.stream("POST", path, content=body, headers=headers) as response:
            reply = StreamReply(response.status_code, response.headers)
            raw = bytearray()
            async for line in _lines(response.aiter_bytes(), raw):
                reply.frames.append(Frame(time.monotonic() - started, line))
            reply.raw = bytes(raw)
        return reply


async def _lines(chunks: AsyncIterator[bytes], raw: bytearray) -> AsyncIterator[str]:
    """Lines as they arrive (split on ``\\n``, like httpx's ``iter_lines``), keeping the bytes."""
    pending = b""
    async for chunk in chunks:
        raw.extend(chunk)
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line.decode()
    if pending:
        yield pending.decode()


# --------------------------------------------------------------------------------------------
# A whole daemon for a test module, with plugins installed once


@dataclass
class DifyEnv:
    daemon: Any  # plugind.daemon.Daemon
    base_url: str
    key: str
    tenant: str
    identifiers: dict[str, str]  # author/name -> installed identifier

    @property
    def redis(self) -> Any:
        return self.daemon.redis

    @property
    def keys(self) -> Any:
        return self.daemon.keys


@contextlib.asynccontextmanager
async def running_dify(
    *,
    admin_database_url: str,
    redis_url: str,
    plugin_dir: Path,
    packages: list[bytes],
    tenant: str = "tenant-1",
    key: str = "dify-key",
    **changes: Any,
) -> AsyncIterator[DifyEnv]:
    """A daemon on its own namespace and database, with ``packages`` installed for ``tenant``."""
    from plugind.client import Client
    from plugind.config import Settings
    from plugind.daemon import running_daemon
    from plugind.messages import Installed

    namespace = f"test-{uuid.uuid4().hex[:12]}"
    database = f"plugind_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    head = admin_database_url.partition("?")[0].rpartition("/")[0]
    settings = Settings(
        redis_url=redis_url,
        database_url=f"{head}/{database}",
        namespace=namespace,
        plugin_dir=plugin_dir,
        http_port=0,
        gateway_port=0,
        http_host="127.0.0.1",
        api_key=key,
        task_timeout=60.0,
        install_timeout=300.0,
        node=f"node-{namespace}",
    )
    settings = replace(settings, **changes)
    try:
        async with running_daemon(settings, shutdown_grace_s=5) as daemon:
            assert daemon.redis is not None
            client = Client(daemon.redis, daemon.keys)
            identifiers: dict[str, str] = {}
            rids = [await client.install(package, tenant_id=tenant) for package in packages]
            for rid in rids:
                event = await client.wait(rid, timeout=300)
                assert isinstance(event, Installed), event
                identifiers[event.plugin_id] = event.identifier
            yield DifyEnv(
                daemon=daemon,
                base_url=f"http://127.0.0.1:{daemon.ports['api']}",
                key=key,
                tenant=tenant,
                identifiers=identifiers,
            )
    finally:
        await _drop_namespace(redis_url, namespace)
        admin = await asyncpg.connect(admin_database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()


async def _drop_namespace(redis_url: str, namespace: str) -> None:
    client: aioredis.Redis = aioredis.Redis.from_url(redis_url)
    try:
        pattern = "\\{" + namespace + "\\}:*"
        batch: list[Any] = []
        async for found in client.scan_iter(match=pattern, count=500):
            batch.append(found)
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()
