"""Plugin life cycle per tenant: upgrade, uninstall, isolation; streamed output; size limits."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from e2e import eventually
from plugin_factory import ECHO, package_bytes, write_plugin

from plugind.client import Client
from plugind.config import Settings
from plugind.daemon import Daemon, running_daemon
from plugind.messages import (
    CommandRejected,
    Installed,
    InstallFailed,
    TaskFailed,
    TaskSucceeded,
    Uninstalled,
)

pytestmark = pytest.mark.anyio

STREAMER = """\
for i in range(int(tool_parameters["n"])):
    yield self.create_text_message(f"part {i}")
"""


def _version(tmp: Path, version: str) -> bytes:
    folder = write_plugin(
        tmp / version, name="cycle", version=version, tools={"echo": ECHO, "streamer": STREAMER}
    )
    return package_bytes(folder)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("cycle")
    return {v: _version(tmp, v) for v in ("0.1.0", "0.2.0")}


async def _echo(client: Client, tenant: str) -> Any:
    rid = await client.invoke_tool(
        "acme/cycle", "cycle", "echo", {"x": 1}, tenant_id=tenant, user_id="u"
    )
    return await client.wait(rid, timeout=60)


async def test_upgrade_uninstall_and_tenant_isolation(
    daemon: Daemon, client: Client, versions: dict[str, bytes], settings: Settings
) -> None:
    first = await client.wait(await client.install(versions["0.1.0"], tenant_id="t1"), 300)
    assert isinstance(first, Installed) and first.upgraded_from is None

    other_tenant = await _echo(client, "t2")
    assert isinstance(other_tenant, TaskFailed) and other_tenant.error.code == "not_installed"

    second = await client.wait(await client.install(versions["0.2.0"], tenant_id="t1"), 300)
    assert isinstance(second, Installed), second
    assert second.version == "0.2.0" and second.upgraded_from == first.identifier
    ran = await _echo(client, "t1")
    assert isinstance(ran, TaskSucceeded), ran

    # the old version stays reachable by its full identifier while its package is stored
    pinned = await client.wait(
        await client.invoke_tool(first.identifier, "cycle", "echo", {"x": 2}, user_id="u"), 60
    )
    assert isinstance(pinned, TaskSucceeded), pinned

    assert settings.database_url is not None
    await eventually(
        settings.database_url,
        "SELECT version FROM plugins WHERE tenant_id = 't1' AND plugin_id = 'acme/cycle'",
        expect="0.2.0",
    )

    gone = await client.wait(await client.uninstall("acme/cycle", tenant_id="t1"), 60)
    assert isinstance(gone, Uninstalled) and gone.identifier == second.identifier
    after = await _echo(client, "t1")
    assert isinstance(after, TaskFailed) and after.error.code == "not_installed"

    again = await client.wait(await client.uninstall("acme/cycle", tenant_id="t1"), 60)
    assert isinstance(again, CommandRejected) and again.error.code == "not_installed"
    await eventually(
        settings.database_url,
        "SELECT status FROM plugins WHERE tenant_id = 't1' AND plugin_id = 'acme/cycle'",
        expect="uninstalled",
    )


async def test_streamed_task_publishes_chunks_as_they_come(
    daemon: Daemon, client: Client, versions: dict[str, bytes], redis: Any
) -> None:
    assert isinstance(await client.wait(await client.install(versions["0.1.0"]), 300), Installed)
    rid = await client.invoke_tool(
        "acme/cycle", "cycle", "streamer", {"n": 3}, user_id="u", stream=True
    )
    done = await client.wait(rid, timeout=60)
    assert isinstance(done, TaskSucceeded), done
    out = await redis.xrange(daemon.keys.out(rid))
    chunks = [orjson.loads(f[b"chunk"]) for _id, f in out if b"chunk" in f]
    assert [c["message"]["text"] for c in chunks] == ["part 0", "part 1", "part 2"]
    assert b"end" in out[-1][1]
    assert orjson.loads(out[-1][1][b"end"])["type"] == "task.succeeded"
    assert 0 < await redis.ttl(daemon.keys.out(rid)) <= 600


async def test_oversized_commands_and_packages_are_refused(
    settings: Settings, redis: Any, versions: dict[str, bytes]
) -> None:
    small = replace(settings, max_package_size=len(versions["0.1.0"]) - 1)
    async with running_daemon(small, shutdown_grace_s=5) as daemon:
        client = Client(redis, daemon.keys)
        too_big = await client.wait(await client.install(versions["0.1.0"]), 60)
        assert isinstance(too_big, InstallFailed), too_big
        assert too_big.error.code == "package_too_large"

        huge = {"blob": base64.b64encode(b"x" * 100_000).decode()}
        rid = await client.invoke_tool("acme/cycle", "cycle", "echo", huge, user_id="u")
        rejected = await client.wait(rid, timeout=60)
        assert isinstance(rejected, CommandRejected), rejected
        assert rejected.error.code == "payload_too_large"
        assert rejected.request_id == rid


async def test_packages_that_cannot_run_fail_to_install_with_the_reason(
    daemon: Daemon, client: Client, tmp_path: Path
) -> None:
    no_source = write_plugin(tmp_path / "nosrc", name="nosrc", tools={"echo": ECHO})
    (no_source / "tools" / "echo.py").unlink()
    bad_deps = write_plugin(tmp_path / "baddeps", name="baddeps", tools={"echo": ECHO})
    (bad_deps / "requirements.txt").write_text(
        "dify-plugin==0.10.2\nplugind-no-such-package-anywhere==9.9.9\n"
    )
    failures = {}
    for folder in (no_source, bad_deps):
        event = await client.wait(await client.install(package_bytes(folder)), timeout=300)
        assert isinstance(event, InstallFailed), event
        failures[folder.name] = event.error
    assert failures["nosrc"].code in ("plugin_start_failed", "invalid_package")
    assert "echo.py" in failures["nosrc"].message
    assert failures["baddeps"].code == "dependency_install_failed"
    assert "plugind-no-such-package-anywhere" in failures["baddeps"].message


async def test_with_verification_on_only_signed_packages_install(
    settings: Settings, redis: Any, versions: dict[str, bytes], tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from plugind.package.signature import sign_package

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "publisher.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    strict = replace(settings, verify_signature=True, signature_public_keys=(public,))
    async with running_daemon(strict, shutdown_grace_s=5) as daemon:
        client = Client(redis, daemon.keys)
        unsigned = await client.wait(await client.install(versions["0.1.0"]), 60)
        assert isinstance(unsigned, InstallFailed), unsigned
        assert unsigned.error.code == "signature_invalid"
        assert unsigned.plugin_id == "acme/cycle"

        signed = sign_package(versions["0.1.0"], private)
        installed = await client.wait(await client.install(signed), 300)
        assert isinstance(installed, Installed), installed
