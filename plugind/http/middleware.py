"""Counting HTTP requests by route template, status and duration (``plugind.metrics``).

A plain ASGI wrapper around each server's app: Starlette puts the matched route in
``scope["route"]``, so requests are counted by template (``/plugin/{tenant_id}/…``), never by
raw path, which would make one series per tenant or request id. A streamed response (server-sent
events, Dify's dispatch) is timed until its headers went out.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from plugind.metrics import NodeMetrics

UNMATCHED = "<unmatched>"


class HttpMetrics:
    def __init__(self, app: ASGIApp, metrics: NodeMetrics, *, server: str) -> None:
        self.app = app
        self._metrics = metrics
        self._server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        elapsed: float | None = None

        async def sending(message: Message) -> None:
            nonlocal status, elapsed
            if message["type"] == "http.response.start":
                status = int(message["status"])
                elapsed = time.perf_counter() - started
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            method = scope.get("method", "GET")
            self._metrics.http_requests.labels(self._server, method, template, str(status)).inc()
            self._metrics.http_duration.labels(self._server, template).observe(
                elapsed if elapsed is not None else time.perf_counter() - started
            )
