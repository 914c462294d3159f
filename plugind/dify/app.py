"""The Dify dialect's routes, mounted by the daemon into the :5002 app
(docs/dify.md, "What Dify's console does, and what plugind does for it").

``/plugin/{tenant_id}/management/…`` and ``asset/{id}`` (:mod:`plugind.dify.management`),
``/plugin/{tenant_id}/dispatch/…`` (:mod:`plugind.dify.dispatch`),
``/plugin/{tenant_id}/endpoint/…`` (:mod:`plugind.dify.endpoints`), remote debugging refused
with a clear answer, and, last, a catch-all that answers any other ``/plugin/…`` path with a
Dify-shaped 404. The ``X-Api-Key`` check (:mod:`plugind.http.auth`) runs before all of them.
The plugin endpoints themselves, ``/e/{hook_id}/…`` (:mod:`plugind.dify.hooks`), are public.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from plugind.dify.deps import DifyDeps
from plugind.dify.dispatch import dispatch_routes
from plugind.dify.endpoints import Endpoints
from plugind.dify.envelope import bad_request, error, not_found
from plugind.dify.hooks import Hooks
from plugind.dify.management import Management, error_response

_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def dify_routes(deps: DifyDeps) -> list[BaseRoute]:
    """Every route of the Dify daemon API over ``deps``."""
    return [
        *Management(deps).routes(),
        *dispatch_routes(deps),
        *Endpoints(deps).routes(),
        *Hooks(deps).routes(),
        *_not_supported(),
        Route("/plugin/{rest:path}", _unknown, methods=_ALL_METHODS),
    ]


def _not_supported() -> list[BaseRoute]:
    """Remote debugging of plugins: refused clearly."""

    def refuse(what: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return error(bad_request(f"{what} is not supported by plugind"))

        return endpoint

    base = "/plugin/{tenant_id}"
    return [
        Route(f"{base}/debugging/key", refuse("remote debugging of plugins"), methods=["POST"]),
    ]


async def _unknown(request: Request) -> Response:
    return error_response(404, not_found(f"route not found: {request.method} {request.url.path}"))
