"""Uploads with signatures: ``verify_signature`` as dify-api sends it, and what Dify is told.

A signed package whose signature a trusted key accepts is reported with its ``verification``
(``langgenius`` unless the package names its category) and ``verified`` in its manifest; with
``verify_signature=true`` an unsigned or foreign-signed package is refused. No daemon: the
:5002 app over ASGI with real Redis and Postgres, since an upload installs nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dify_wire import DifyRaised, envelope_data
from plugin_factory import ECHO, package_bytes, write_plugin

from plugind.bus.keys import Keys
from plugind.config import Settings
from plugind.dify.app import dify_routes
from plugind.dify.deps import DifyDeps
from plugind.http.read_api import create_read_app
from plugind.package.signature import sign_package

pytestmark = pytest.mark.anyio
KEY = "k"


def _pair() -> tuple[bytes, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


TRUSTED_PRIVATE, TRUSTED_PUBLIC = _pair()
OTHER_PRIVATE, _ = _pair()


@pytest.fixture
async def http(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys
) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(namespace=keys.namespace, api_key=KEY)
    deps = DifyDeps(
        redis=redis, keys=keys, pool=pool, settings=settings, signature_keys=(TRUSTED_PUBLIC,)
    )
    app = create_read_app(
        redis=redis, pool=pool, keys=keys, version="1", api_key=KEY, extra_routes=dify_routes(deps)
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers={"X-Api-Key": KEY}
    ) as client:
        yield client


async def _upload(http: httpx.AsyncClient, package: bytes, verify: bool) -> Any:
    response = await http.post(
        "/plugin/t1/management/install/upload/package",
        files={"dify_pkg": ("dify_pkg", package, "application/octet-stream")},
        data={"verify_signature": "true" if verify else "false"},
    )
    assert response.status_code == 200
    return envelope_data(response.content)


async def test_signed_uploads(http: httpx.AsyncClient, tmp_path: Path) -> None:
    unsigned = package_bytes(write_plugin(tmp_path / "p", name="signed", tools={"echo": ECHO}))
    signed = sign_package(unsigned, TRUSTED_PRIVATE)
    foreign = sign_package(unsigned, OTHER_PRIVATE)

    for verify in (False, True):
        decoded = await _upload(http, signed, verify)
        assert decoded["verification"] == {"authorized_category": "langgenius"}
        assert decoded["manifest"]["verified"] is True

    for package in (unsigned, foreign):
        decoded = await _upload(http, package, False)
        assert decoded["verification"] is None and decoded["manifest"]["verified"] is False
        with pytest.raises(DifyRaised) as refused:
            await _upload(http, package, True)
        assert refused.value.raised == "PluginDaemonBadRequestError"
        assert "bad signature" in refused.value.description

    # decoding reports the signature of what is stored under the identifier. The Dify checksum
    # ignores the zip comment, so all three share one identifier; the package stored last under
    # it counts (upstream keeps one file per identifier): here the foreign-signed one
    identifier = decoded["unique_identifier"]
    response = await http.request(
        "GET",
        "/plugin/t1/management/decode/from_identifier",
        content=json.dumps({"plugin_unique_identifier": identifier}),
        headers={"Content-Type": "application/json"},
    )
    assert envelope_data(response.content)["verification"] is None
