"""The client of Dify's inner API (``$DIFY_INNER_API_URL/inner/api/…``).

One pooled ``httpx.AsyncClient`` per daemon serves every call, however many plugins call at
once: at most ``DIFY_INNER_API_POOL_SIZE`` connections, kept alive between calls; a call that
finds them all busy waits for one (within the read timeout). Upstream's timeouts apply: 5 s to
connect and to write the request, 240 s for each read of the answer (an LLM that goes quiet
that long is given up on, before the SDK's own 250 s wait ends).

Every call is a POST of JSON with ``X-Inner-Api-Key``. dify-api checks ``tenant_id`` and
``user_id`` first (HTTP 500 without them), then the key (HTTP 404 when it is wrong). A streamed
answer is length-prefixed frames (:mod:`plugind.backwards.frames`), any other a JSON document;
either way each item is ``{"data": ..., "error": "..."}`` and a non-empty ``error`` ends the
call with it. Every failure is an :class:`InnerApiError` whose message says what happened.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import httpx
import orjson

from plugind.backwards.errors import FrameError, InnerApiError
from plugind.backwards.frames import MAGIC, FrameDecoder
from plugind.config import Settings

log = logging.getLogger(__name__)

KEY_HEADER: Final = "X-Inner-Api-Key"
# upstream's RESPONSE_MAX_BUFFER_SIZE: the largest frame (or plain answer) read
MAX_FRAME: Final = 30 * 1024 * 1024
_ERROR_BODY: Final = 300  # bytes of an HTTP error's body quoted in the message

OnItem = Callable[[Any], Awaitable[None]]


class InnerApi:
    """Calls into Dify's inner API over one bounded connection pool; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        connect_timeout: float = 5.0,
        write_timeout: float = 5.0,
        read_timeout: float = 240.0,
        pool_size: int = 64,
        max_frame: int = MAX_FRAME,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.read_timeout = read_timeout
        self.max_frame = max_frame
        self._headers = {KEY_HEADER: key, "Content-Type": "application/json"}
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=connect_timeout, write=write_timeout, read=read_timeout, pool=read_timeout
            ),
            limits=httpx.Limits(
                max_connections=pool_size,
                max_keepalive_connections=pool_size,
                keepalive_expiry=120,
            ),
            trust_env=False,  # an internal API: never through the environment's proxies
            transport=transport,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> InnerApi | None:
        """The client ``DIFY_INNER_API_URL`` asks for; None when it is not set."""
        if not settings.dify_api_url:
            return None
        return cls(
            settings.dify_api_url,
            settings.dify_inner_api_key or "",
            connect_timeout=settings.dify_inner_api_connect_timeout,
            write_timeout=settings.dify_inner_api_write_timeout,
            read_timeout=settings.dify_inner_api_read_timeout,
            pool_size=settings.dify_inner_api_pool_size,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def url(self, path: str) -> str:
        return f"{self.base_url}/inner/api/{path.lstrip('/')}"

    async def call(self, path: str, body: dict[str, Any]) -> Any:
        """The ``data`` of a one-document answer."""
        items: list[Any] = []

        async def keep(item: Any) -> None:
            items.append(item)

        await self.exchange(path, body, keep)
        if not items:
            raise InnerApiError(f"Dify's inner API answered {path} with nothing")
        return items[0]

    async def exchange(self, path: str, body: dict[str, Any], on_item: OnItem) -> int:
        """POST ``body`` to ``path`` and hand each item's ``data`` to ``on_item`` as it arrives.

        Returns how many items there were. Raises :class:`InnerApiError`.
        """
        url = self.url(path)
        try:
            async with self._http.stream(
                "POST", url, content=orjson.dumps(body), headers=self._headers
            ) as response:
                if response.status_code != 200:
                    raise InnerApiError(await _status_error(response, path))
                return await self._read(response, path, on_item)
        except httpx.ConnectError as exc:
            raise InnerApiError(
                f"Dify's inner API at {self.base_url} is unreachable: {exc or type(exc).__name__}"
            ) from None
        except httpx.TimeoutException as exc:
            what = {
                httpx.ConnectTimeout: "did not accept a connection",
                httpx.WriteTimeout: "did not take the request",
                httpx.PoolTimeout: "had no free connection",
            }.get(type(exc), "did not answer")
            raise InnerApiError(
                f"Dify's inner API {what} in time ({path}; read timeout {self.read_timeout:g}s)"
            ) from None
        except httpx.HTTPError as exc:
            raise InnerApiError(
                f"the call to Dify's inner API ({path}) failed: {exc or type(exc).__name__}"
            ) from None

    async def _read(self, response: httpx.Response, path: str, on_item: OnItem) -> int:
        frames: FrameDecoder | None = None
        plain = bytearray()
        count = 0
        async for chunk in response.aiter_bytes():
            if not chunk:
                continue
            if frames is None and not plain and chunk[0] == MAGIC:
                frames = FrameDecoder(self.max_frame)
            if frames is None:
                plain += chunk
                if len(plain) > self.max_frame:
                    raise InnerApiError(
                        f"Dify's answer to {path} is over the {self.max_frame}-byte limit"
                    )
                continue
            try:
                payloads = frames.feed(chunk)
            except FrameError as exc:
                raise InnerApiError(f"Dify's answer to {path} is not readable: {exc}") from None
            for payload in payloads:
                await on_item(_item(payload, path))
                count += 1
        if frames is not None:
            if frames.pending:
                raise InnerApiError(f"Dify's answer to {path} was cut off in a frame")
            return count
        if not plain.strip():
            return 0
        await on_item(_item(bytes(plain), path))
        return 1


def _item(raw: bytes, path: str) -> Any:
    """The ``data`` of one ``{"data", "error"}`` item; raises with a non-empty ``error``."""
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InnerApiError(f"Dify's answer to {path} is not JSON: {exc}") from None
    if not isinstance(item, dict):
        raise InnerApiError(f"Dify's answer to {path} is not an object")
    error = item.get("error")
    if error:
        raise InnerApiError(str(error))
    data = item.get("data")
    if data is None:
        raise InnerApiError(f"Dify's answer to {path} has no data")
    return data


async def _status_error(response: httpx.Response, path: str) -> str:
    status = response.status_code
    try:
        body = (await response.aread())[:_ERROR_BODY].decode("utf-8", "replace").strip()
    except httpx.HTTPError:
        body = ""
    hint = ""
    if status == 404:
        hint = " (a wrong DIFY_INNER_API_KEY, or a Dify without this route)"
    elif status in (401, 403):
        hint = " (check DIFY_INNER_API_KEY)"
    return f"Dify's inner API answered HTTP {status} to {path}{hint}" + (
        f": {body}" if body else ""
    )
