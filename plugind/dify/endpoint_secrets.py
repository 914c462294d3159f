"""The secret inputs of endpoint settings: encrypted by Dify, kept outside the event log.

As the upstream daemon does, plugind never holds an endpoint's secrets in clear: Dify's inner
API encrypts them (``invoke/encrypt``, namespace ``endpoint``, the endpoint's id as identity)
on setup and update, and decrypts them for each call of the endpoint. The ciphertexts are kept
in ``endpoint_secrets``, while the events and the ``endpoints`` read model hold the settings
with those fields masked.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import orjson

from plugind.backwards import InnerApi
from plugind.backwards.errors import BackwardsError
from plugind.backwards.kinds import ENCRYPT_PATH
from plugind.dify.envelope import DifyError, internal_error

log = logging.getLogger(__name__)

Schema = list[dict[str, Any]]

_PUT = """
INSERT INTO endpoint_secrets (endpoint_id, tenant_id, secrets) VALUES ($1, $2, $3::text::jsonb)
ON CONFLICT (endpoint_id) DO UPDATE SET secrets = EXCLUDED.secrets, updated_at = now()
"""


async def encrypt(
    inner: InnerApi | None,
    *,
    opt: str,
    tenant_id: str,
    user_id: str,
    endpoint_id: str,
    data: dict[str, Any],
    schema: Schema,
) -> dict[str, Any]:
    """Dify's ``opt`` (``encrypt``, ``decrypt``, ``clear``) of an endpoint's settings."""
    if inner is None:
        raise internal_error(
            "this endpoint has secret settings, which Dify encrypts: set DIFY_INNER_API_URL "
            "and DIFY_INNER_API_KEY on plugind"
        )
    body = {
        "tenant_id": tenant_id,
        "user_id": user_id,
        "type": "encrypt",
        "opt": opt,
        "namespace": "endpoint",
        "identity": endpoint_id,
        "data": data,
        "config": schema,
    }
    try:
        answer = await inner.call(ENCRYPT_PATH, body)
    except BackwardsError as exc:
        raise internal_error(f"failed to {opt} the endpoint's settings: {exc}") from None
    if isinstance(answer, dict) and isinstance(answer.get("data"), dict):
        answer = answer["data"]  # dify-api wraps the settings once more
    if not isinstance(answer, dict):
        raise internal_error(f"Dify answered the {opt} of the endpoint's settings with {answer!r}")
    return answer


class EndpointSecrets:
    def __init__(self, pool: asyncpg.Pool, inner: InnerApi | None) -> None:
        self.pool = pool
        self.inner = inner

    async def keep(
        self,
        tenant_id: str,
        user_id: str,
        endpoint_id: str,
        secrets: dict[str, Any],
        schema: Schema,
        *,
        kept: dict[str, Any] | None = None,
    ) -> None:
        """Encrypt ``secrets`` and store them with ``kept`` (ciphertexts already stored), in
        place of whatever the endpoint had."""
        encrypted: dict[str, Any] = {}
        if secrets:
            answer = await encrypt(
                self.inner,
                opt="encrypt",
                tenant_id=tenant_id,
                user_id=user_id,
                endpoint_id=endpoint_id,
                data=secrets,
                schema=schema,
            )
            encrypted = {name: answer.get(name) for name in secrets}
        merged = {**(kept or {}), **encrypted}
        await self.pool.execute(_PUT, endpoint_id, tenant_id, orjson.dumps(merged).decode())

    async def stored(self, endpoint_id: str) -> dict[str, Any]:
        raw = await self.pool.fetchval(
            "SELECT secrets::text FROM endpoint_secrets WHERE endpoint_id = $1", endpoint_id
        )
        return orjson.loads(raw) if raw else {}

    async def decrypted(
        self, tenant_id: str, endpoint_id: str, secrets: dict[str, Any], schema: Schema
    ) -> dict[str, Any]:
        """The clear values of ``secrets`` (ciphertexts as stored), for a call of the endpoint."""
        answer = await encrypt(
            self.inner,
            opt="decrypt",
            tenant_id=tenant_id,
            user_id="",
            endpoint_id=endpoint_id,
            data=secrets,
            schema=schema,
        )
        return {name: answer.get(name) for name in secrets}

    async def forget(self, tenant_id: str, endpoint_id: str) -> None:
        """Drop an endpoint's secrets, and ask Dify to drop its cache of them."""
        deleted = await self.pool.fetchval(
            "DELETE FROM endpoint_secrets WHERE endpoint_id = $1 RETURNING 1", endpoint_id
        )
        if deleted:
            await self.clear_cache(tenant_id, endpoint_id)

    async def clear_cache(self, tenant_id: str, endpoint_id: str) -> None:
        """Ask Dify to forget its cached decryption of the endpoint (best effort, as upstream)."""
        if self.inner is None:
            return
        try:
            await encrypt(
                self.inner,
                opt="clear",
                tenant_id=tenant_id,
                user_id="",
                endpoint_id=endpoint_id,
                data={},
                schema=[],
            )
        except DifyError as exc:
            log.warning("Endpoint %s: Dify did not clear its cache: %s", endpoint_id, exc)
