"""``X-Api-Key`` on port 5002 (docs/dify.md; docs/configuration.md, ``PLUGIND_API_KEY``): the
Dify daemon API and the read routes that return tenants' data need it; health, metrics and the
aggregate stats stay open.

A pure ASGI middleware, so it runs before routing (an unknown ``/plugin/…`` path is refused
like a known one, and nothing runs for a refused request) and never buffers a streamed answer.
The key is compared in constant time. Without a configured key the protected routes answer 401
with a message naming ``PLUGIND_API_KEY``: an open daemon API would let anyone install code.
"""

from __future__ import annotations

import hmac
from typing import Final

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

API_KEY_HEADER: Final = b"x-api-key"
# The Dify daemon API; its clients expect the Dify envelope even on a 401.
DIFY_PREFIX: Final = "/plugin/"
# The read routes that return tenants' data. `/api/v1/plugins/stats` (aggregates) stays open.
_PROTECTED_EXACT: Final = frozenset({"/api/v1/plugins", "/api/v1/events"})
_PROTECTED_PREFIXES: Final = ("/api/v1/tasks/", "/api/v1/events/")


def needs_key(path: str) -> bool:
    """Whether a request to ``path`` on port 5002 must carry the API key."""
    if path.startswith(DIFY_PREFIX):
        return True
    trimmed = path.rstrip("/") or "/"
    return trimmed in _PROTECTED_EXACT or path.startswith(_PROTECTED_PREFIXES)


class ApiKeyGuard:
    """Refuse requests to protected paths without the right ``X-Api-Key`` (HTTP 401)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not needs_key(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self._key is None:
            await _refuse(
                scope,
                send,
                "this route needs an API key, and none is configured: set PLUGIND_API_KEY "
                "(Dify: SERVER_KEY) on the daemon and send it as X-Api-Key",
            )
            return
        given = b""
        for name, value in scope["headers"]:
            if name == API_KEY_HEADER:
                given = value
                break
        if not hmac.compare_digest(given, self._key):
            await _refuse(scope, send, "missing or wrong X-Api-Key")
            return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, message: str) -> None:
    if scope["path"].startswith(DIFY_PREFIX):
        # the shape dify-api parses (upstream answers the same, with HTTP 401)
        detail = {"error_type": "PluginDaemonUnauthorizedError", "message": message, "args": None}
        body = orjson.dumps({"code": -401, "message": orjson.dumps(detail).decode(), "data": None})
    else:
        body = orjson.dumps({"error": {"code": "unauthorized", "message": message}})
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'ApiKey header="X-Api-Key"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
