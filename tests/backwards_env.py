"""A daemon for a test module, with the fake of Dify's inner API and plugins installed once.

The daemon runs in a supervisor task the module fixture owns, so a test can restart it
(:meth:`BackwardsEnv.restart`: same database and namespace, another node) and go on with the
new one. ``base_url`` and ``redis`` always point at the current daemon.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson
from anyio.abc import TaskGroup, TaskStatus
from backwards_plugins import write_bare, write_relayer
from dify_wire import DifyApi, _drop_namespace
from fake_dify import FakeDify

from plugind.bus.codec import EVENT_FIELD
from plugind.client import Client
from plugind.config import Settings
from plugind.messages import AnyEvent, Installed, decode_event
from plugind.package.difypkg import build_package

TENANT = "tenant-b"
API_KEY = "dify-key"


@dataclass
class BackwardsEnv:
    settings: Settings
    fake: FakeDify
    identifiers: dict[str, str] = field(default_factory=dict)
    daemon: Any = None
    fake_tg: TaskGroup | None = None  # where the fake serves (to start it again after a stop)
    _restart: anyio.Event = field(default_factory=anyio.Event)
    _ready: anyio.Event = field(default_factory=anyio.Event)
    _closing: bool = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.ports['api']}"

    @property
    def redis(self) -> Any:
        return self.daemon.redis

    @property
    def keys(self) -> Any:
        return self.daemon.keys

    @property
    def database_url(self) -> str:
        assert self.settings.database_url is not None
        return self.settings.database_url

    def api(self) -> DifyApi:
        return DifyApi(self.base_url, API_KEY)

    async def restart(self) -> None:
        """Stop the daemon and start another on the same database and namespace."""
        self._ready = anyio.Event()
        self._restart.set()
        with anyio.fail_after(60):
            await self._ready.wait()

    async def events_of(self, request_id: str) -> list[AnyEvent]:
        entries: Any = await self.redis.xrange(self.keys.events)
        events = [decode_event(fields[EVENT_FIELD.encode()]) for _id, fields in entries]
        return [e for e in events if e.request_id == request_id]

    async def _supervise(self, *, task_status: TaskStatus[None]) -> None:
        from plugind.daemon import running_daemon

        started = False
        generation = 0
        while not self._closing:
            settings = replace(self.settings, node=f"{self.settings.node}-{generation}")
            async with running_daemon(settings, shutdown_grace_s=5) as daemon:
                self.daemon = daemon
                self._restart = anyio.Event()
                self._ready.set()
                if not started:
                    started = True
                    task_status.started()
                await self._restart.wait()
            generation += 1

    async def _close(self) -> None:
        self._closing = True
        self._restart.set()


@contextlib.asynccontextmanager
async def backwards_env(
    *,
    admin_database_url: str,
    redis_url: str,
    plugin_dir: Path,
    packages: list[bytes],
    **changes: Any,
) -> AsyncIterator[BackwardsEnv]:
    """A fake Dify and a daemon pointed at it, with ``packages`` installed for :data:`TENANT`."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    database = f"plugind_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    head = admin_database_url.partition("?")[0].rpartition("/")[0]
    fake = FakeDify()
    try:
        async with anyio.create_task_group() as tg:
            await fake.start(tg)
            settings = Settings(
                redis_url=redis_url,
                database_url=f"{head}/{database}",
                namespace=namespace,
                plugin_dir=plugin_dir,
                http_port=0,
                gateway_port=0,
                http_host="127.0.0.1",
                api_key=API_KEY,
                task_timeout=60.0,
                install_timeout=300.0,
                node=f"node-{namespace}",
                dify_api_url=fake.url,
                dify_inner_api_key=fake.key,
                **changes,
            )
            env = BackwardsEnv(settings, fake, fake_tg=tg)
            await tg.start(env._supervise)
            client = Client(env.redis, env.keys)
            for package in packages:
                rid = await client.install(package, tenant_id=TENANT)
                event = await client.wait(rid, timeout=300)
                assert isinstance(event, Installed), event
                env.identifiers[event.plugin_id] = event.identifier
            try:
                yield env
            finally:
                await env._close()
                await fake.stop()
    finally:
        await _drop_namespace(redis_url, namespace)
        admin = await asyncpg.connect(admin_database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()


def json_messages(messages: list[Any]) -> list[Any]:
    return [m["message"]["json_object"] for m in messages if m["type"] == "json"]


def text_messages(messages: list[Any]) -> list[str]:
    return [m["message"]["text"] for m in messages if m["type"] == "text"]


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


@contextlib.asynccontextmanager
async def relayer_env(
    *,
    admin_database_url: str,
    redis_url: str,
    plugin_dir: Path,
    workdir: Path,
    **settings: Any,
) -> AsyncIterator[BackwardsEnv]:
    """:func:`backwards_env` with ``acme/relayer`` and its unpermitted twin ``acme/bare``."""
    relayer = write_relayer(workdir / "relayer")
    bare = write_bare(workdir / "bare")
    async with backwards_env(
        admin_database_url=admin_database_url,
        redis_url=redis_url,
        plugin_dir=plugin_dir,
        packages=[build_package(relayer), build_package(bare)],
        **settings,
    ) as running:
        yield running
