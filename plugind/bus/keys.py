"""Every Redis key plugind uses is spelled here, and only here.

The namespace is wrapped in braces so it is a Redis Cluster hash tag: all keys of one namespace
share a slot, which makes MULTI/EXEC and Lua over several of them legal. Scaling past one Redis
is N namespaces chosen by a hash of the plugin id (:func:`shard_for`), so nothing but this module
needs to know about shards.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

WORKERS_GROUP: Final = "workers"
PROJECTOR_GROUP: Final = "projector"


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str = "plugind"

    @property
    def tag(self) -> str:
        return "{" + self.namespace + "}"

    @property
    def install(self) -> str:
        return f"{self.tag}:install"

    @property
    def tasks(self) -> str:
        return f"{self.tag}:tasks"

    @property
    def events(self) -> str:
        return f"{self.tag}:events"

    @property
    def dead(self) -> str:
        return f"{self.tag}:dead"

    @property
    def installed(self) -> str:
        """Hash ``<tenant>\\x1f<author/name>`` -> identifier: what the workers see as installed.

        It changes in the same atomic step as the terminal install/uninstall event, so a task
        published right after ``plugin.installed`` always finds the plugin, whatever the projector's
        lag.
        """
        return f"{self.tag}:installed"

    @property
    def nodes(self) -> str:
        """Sorted set of the worker nodes that report (score: their last report, Unix time).

        An index, so that readers find the reports without a SCAN over the whole keyspace.
        """
        return f"{self.tag}:nodes"

    def node(self, node: str) -> str:
        """Hash: a worker node's last report (``at``, ``version``, ``pool``); expires unless
        the node refreshes it, so only live nodes have one."""
        return f"{self.tag}:node:{node}"

    def metrics(self, node: str) -> str:
        """String: a node's metric registry in Prometheus text, zlib-compressed; expires unless
        the node refreshes it (``bus.metrics_share``)."""
        return f"{self.tag}:metrics:{node}"

    @property
    def metrics_nodes(self) -> str:
        """Sorted set of the nodes that publish metrics (score: their last publication)."""
        return f"{self.tag}:metrics_nodes"

    @property
    def lifecycle(self) -> str:
        """Pub/sub channel: a node that changed the registry announces the versions installed and
        possibly unused, so that every node starts or retires them (``installed.lifecycle``)."""
        return f"{self.tag}:lifecycle"

    @property
    def command_streams(self) -> tuple[str, str]:
        return (self.install, self.tasks)

    def out(self, request_id: str) -> str:
        return f"{self.tag}:out:{request_id}"

    def done(self, request_id: str) -> str:
        return f"{self.tag}:done:{request_id}"


def installed_field(tenant_id: str, plugin_id: str) -> str:
    return f"{tenant_id}\x1f{plugin_id}"


def shard_namespace(base: str, shards: int, plugin_id: str) -> str:
    """The namespace that owns ``plugin_id`` when a deployment runs ``shards`` namespaces."""
    if shards <= 1:
        return base
    return f"{base}:{shard_for(plugin_id, shards)}"


def shard_for(plugin_id: str, shards: int) -> int:
    # crc32 rather than hash(): it must agree across processes and languages.
    return zlib.crc32(plugin_id.encode()) % shards
