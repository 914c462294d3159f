"""``plugind import-dify``: the plugins Dify's own daemon had installed, installed by plugind.

A database laid out as the upstream daemon leaves ``dify_plugin`` (its tables in ``public``)
and a storage folder as it leaves ``/app/storage`` (packages under ``plugin_packages/``); a
running plugind on that same database; the command, run as an operator runs it. Afterwards
Dify's management API lists each tenant's plugins with the source and meta Dify had recorded,
and the upstream tables are as they were.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from e2e import EXAMPLE_CALC

from plugind.cli.import_dify import request_id
from plugind.config import Settings
from plugind.daemon import running_daemon
from plugind.package.difypkg import build_package, read_package

pytestmark = pytest.mark.anyio

TENANT_A = str(uuid.uuid4())
TENANT_B = str(uuid.uuid4())

UPSTREAM = """
CREATE TABLE plugin_installations (
    id uuid PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(), tenant_id uuid, plugin_id varchar(255),
    plugin_unique_identifier varchar(255), runtime_type varchar(127), endpoints_setups integer,
    endpoints_active integer, source varchar(63), meta text);
"""


async def _cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PLUGIN_STORAGE_LOCAL_ROOT",)}
    env.update(
        REDIS_URL=settings.redis_url or "",
        DATABASE_URL=settings.database_url or "",
        PLUGIND_NAMESPACE=settings.namespace,
    )
    result = await anyio.run_process(
        [sys.executable, "-m", "plugind.cli", "import-dify", *args], env=env, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_import_from_the_upstream_daemon(
    settings: Settings, database_url: str, redis: Any, tmp_path: Path
) -> None:
    package = build_package(EXAMPLE_CALC)
    identifier = read_package(package, max_size=10**8).identifier
    storage = tmp_path / "storage"
    stored = storage / "plugin_packages" / identifier  # author/name:version@checksum
    stored.parent.mkdir(parents=True)
    stored.write_bytes(package)
    missing = "acme/gone:1.0.0@" + "d" * 64
    upstream = await asyncpg.connect(database_url)
    try:
        await upstream.execute(UPSTREAM)
        await upstream.executemany(
            "INSERT INTO plugin_installations (id, tenant_id, plugin_id, plugin_unique_identifier,"
            " runtime_type, source, meta) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [
                (uuid.uuid4(), TENANT_A, "acme/calc", identifier, "local", "marketplace",
                 json.dumps({"plugin_unique_identifier": identifier})),
                (uuid.uuid4(), TENANT_B, "acme/calc", identifier, "local", "package", "{}"),
                (uuid.uuid4(), TENANT_B, "acme/gone", missing, "local", "package", "{}"),
                (uuid.uuid4(), TENANT_A, "dev/debug", "dev/debug:0.0.1@" + "e" * 64, "remote",
                 "remote", "{}"),
            ],
        )  # fmt: skip
    finally:
        await upstream.close()

    code, out, err = await _cli(settings, "--storage", str(storage), "--dry-run")
    assert code == 1, (out, err)  # one package is missing
    assert f"{TENANT_A} {identifier}: would install ({request_id(TENANT_A, identifier)})" in out
    assert f"{TENANT_B} {missing}: skipped: no package" in out
    assert "dev/debug" in out and "skipped: a remote plugin" in out

    async with running_daemon(settings, shutdown_grace_s=5) as daemon:
        code, out, err = await _cli(settings, "--storage", str(storage), "--wait")
        assert code == 1, (out, err)  # still the missing one
        assert f"{TENANT_A} {identifier}: installed" in out, (out, err)
        assert f"{TENANT_B} {identifier}: installed" in out, (out, err)
        again, out, err = await _cli(settings, "--storage", str(storage), "--tenant", TENANT_A)
        assert again == 0 and f"{TENANT_A} {identifier}: queued" in out, (out, err)

        base = f"http://127.0.0.1:{daemon.ports['api']}"
        headers = {"X-Api-Key": settings.api_key or ""}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
            expected = {
                TENANT_A: ("marketplace", {"plugin_unique_identifier": identifier}),
                TENANT_B: ("package", {}),
            }
            for tenant, (source, meta) in expected.items():
                response = await http.get(f"/plugin/{tenant}/management/list")
                (entry,) = response.json()["data"]["list"]
                assert entry["plugin_unique_identifier"] == identifier
                assert (entry["source"], entry["meta"]) == (source, meta)
        assert daemon.redis is not None
        installs = await daemon.redis.xlen(daemon.keys.install)
        assert installs == 3  # one per tenant, and the re-run's duplicate (acknowledged only)

    upstream = await asyncpg.connect(database_url)
    try:
        assert await upstream.fetchval("SELECT count(*) FROM public.plugin_installations") == 4
    finally:
        await upstream.close()
