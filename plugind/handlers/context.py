"""What every handler needs, built once by the daemon."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis

from plugind.bus.emit import Emitter
from plugind.bus.keys import Keys
from plugind.config import Settings
from plugind.installed.local_plugins import LocalPlugins
from plugind.installed.registry import Registry
from plugind.messages import EventFactory
from plugind.metrics import NodeMetrics
from plugind.outage import Outages
from plugind.runtime.backwards import BackwardsRelay
from plugind.runtime.pool import PluginPool


@dataclass(frozen=True, slots=True)
class HandlerContext:
    settings: Settings
    redis: aioredis.Redis
    db: asyncpg.Pool
    keys: Keys
    emitter: Emitter
    events: EventFactory
    registry: Registry
    local: LocalPlugins
    plugins: PluginPool
    signature_keys: tuple[bytes, ...] = ()  # PEM public keys; checked when verify_signature is on
    outages: Outages = field(default_factory=Outages)  # the daemon's, shared by its roles
    # serves plugins' calls back into Dify (plugind.backwards); None: they are refused
    backwards: BackwardsRelay | None = None
    metrics: NodeMetrics = field(default_factory=NodeMetrics)  # the daemon's
