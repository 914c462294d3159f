"""The daemon: connect, migrate, then run the roles in one task group until told to stop.

Shutdown (SIGTERM, SIGINT or :meth:`Daemon.stop`) first stops the consumers from reading, lets
in-flight work finish within ``shutdown_grace_s``, leaves the rest pending for another consumer,
then stops the projector and the HTTP servers, and finally the plugin processes.

Redis and Postgres must answer at start (within ``PLUGIND_CONNECT_TIMEOUT``); after that no
outage of either ends the process. Every role retries with a capped backoff and reports to the
daemon's :class:`~plugind.outage.Outages`, which logs one line when a dependency goes away and
one when it is back, and which ``/health`` and ``/metrics`` read.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import anyio
import asyncpg
import redis.asyncio as aioredis
import uvicorn
from anyio.abc import TaskGroup, TaskStatus
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import ASGIApp

from plugind import __version__
from plugind.backwards import InnerApi, Permissions, PluginStorage, Relay
from plugind.bus.cluster import SlotPin
from plugind.bus.consumer import StreamConsumer
from plugind.bus.emit import Emitter
from plugind.bus.groups import ensure_group
from plugind.bus.keys import WORKERS_GROUP, Keys
from plugind.bus.metrics_share import run_metrics_share
from plugind.bus.nodes import REPORT_INTERVAL_S, claim_node_name, run_reports
from plugind.bus.retention import run_retention
from plugind.config import Settings, check_settings, mask_url
from plugind.errors import ConfigError
from plugind.handlers.context import HandlerContext
from plugind.handlers.dispatch import Dispatcher
from plugind.http.middleware import HttpMetrics
from plugind.installed.lifecycle import RECONCILE_EVERY_S, Lifecycle
from plugind.installed.local_plugins import LocalPlugins
from plugind.installed.registry import Registry
from plugind.messages import EventFactory
from plugind.metrics import NodeMetrics
from plugind.outage import Outages, is_postgres_outage, is_redis_outage
from plugind.package.signature import load_public_keys
from plugind.projections._db import create_pool, quote_ident
from plugind.projections.continuity import continue_stream
from plugind.projections.migrate import migrate
from plugind.projections.projector import Projector
from plugind.runtime.pool import PluginPool

log = logging.getLogger(__name__)

T = TypeVar("T")

ALL_ROLES = ("worker", "projector", "api", "gateway")
MIN_REDIS = (6, 2)
WATCH_INTERVAL_S = 2.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns shutdown."""

    finished: anyio.Event

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def run_until_exit(self) -> None:
        try:
            await self.serve()
        finally:
            self.finished.set()


@dataclass
class Daemon:
    settings: Settings
    roles: tuple[str, ...] = ALL_ROLES
    shutdown_grace_s: float = 30.0
    handle_signals: bool = True
    report_interval_s: float = REPORT_INTERVAL_S  # how often a worker publishes its pool
    redis: aioredis.Redis | None = None
    db: asyncpg.Pool | None = None
    ports: dict[str, int] = field(default_factory=dict)
    consumers: list[StreamConsumer] = field(default_factory=list)
    plugins: PluginPool | None = None
    emitter: Emitter | None = None  # the workers' (tests reach its pipeline's fault hook)
    inner_api: InnerApi | None = None  # Dify's inner API (DIFY_INNER_API_URL), if configured
    lifecycle: Lifecycle | None = None  # the workers' follower of installs and uninstalls
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    slot: SlotPin | None = None
    reconcile_interval_s: float = RECONCILE_EVERY_S
    outages: Outages = field(default_factory=Outages)
    _stop: anyio.Event = field(default_factory=anyio.Event)
    _stopped: bool = False

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.namespace)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """Whether :meth:`run` has finished (every role stopped, connections closed)."""
        return self._stopped

    async def run(self, *, task_status: TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        for role in self.roles:
            if role not in ALL_ROLES:
                raise ConfigError(f"--role: unknown role {role!r} (roles: {', '.join(ALL_ROLES)})")
        check_settings(settings)
        async with contextlib.AsyncExitStack() as stack:
            redis_url, database_url = await self._service_urls(stack)
            self.redis = await _connect_redis(redis_url, settings.connect_timeout)
            stack.push_async_callback(self.redis.aclose)
            self.slot = SlotPin(self.redis, self.keys)  # Redis Cluster: the namespace's master
            await self.slot.pin()
            self.db = await _connect_postgres(
                database_url, settings.connect_timeout, settings.db_schema
            )
            stack.push_async_callback(self.db.close)
            async with self.db.acquire() as conn:
                applied = await migrate(conn, schema=settings.db_schema)
            if applied:
                log.info("Applied database migrations: %s", ", ".join(applied))
            self.inner_api = InnerApi.from_settings(settings)
            if self.inner_api is not None:
                stack.push_async_callback(self.inner_api.aclose)
                log.info("Plugins' calls back into Dify go to %s", self.inner_api.base_url)
            await continue_stream(self.redis, self.db, self.keys)  # after a Redis loss
            self.plugins = PluginPool(
                instances=settings.plugin_instances,
                memory_limit=settings.plugin_memory_limit,
                max_result_size=settings.max_result_size,
                heartbeat_timeout=settings.plugin_heartbeat_timeout,
            )
            stack.push_async_callback(_shielded, self.plugins.aclose)
            self.metrics.watch(
                pool=self.plugins.snapshot if "worker" in self.roles else None,
                consumers=lambda: self.consumers,
                outages=self.outages,
            )
            counter = self.metrics.log_handler()
            logging.getLogger().addHandler(counter)
            stack.callback(logging.getLogger().removeHandler, counter)
            async with anyio.create_task_group() as tg:
                if self.handle_signals:
                    tg.start_soon(self._watch_signals)
                tg.start_soon(self._watch_dependencies)
                tg.start_soon(
                    partial(
                        run_metrics_share,
                        self.redis,
                        self.keys,
                        node=settings.node,
                        registry=self.metrics.registry,
                        interval=self.report_interval_s,
                    )
                )
                servers = await self._start_roles(tg)
                self._log_started()
                task_status.started(self)
                await self._stop.wait()
                log.info(
                    "Shutting down: no new commands; in-flight work gets %.0fs",
                    self.shutdown_grace_s,
                )
                for consumer in self.consumers:
                    consumer.stop()
                with anyio.move_on_after(self.shutdown_grace_s + 5):
                    while any(c.in_flight for c in self.consumers):
                        await anyio.sleep(0.05)
                for server in servers:
                    server.should_exit = True
                with anyio.move_on_after(5):
                    for server in servers:
                        await server.finished.wait()
                tg.cancel_scope.cancel()
        self._stopped = True
        log.info("Plugin daemon stopped")

    async def _service_urls(self, stack: contextlib.AsyncExitStack) -> tuple[str, str]:
        settings = self.settings
        redis_url, database_url = settings.redis_url, settings.database_url
        if redis_url is None or database_url is None:
            from plugind.embedded import embedded_services

            urls = await stack.enter_async_context(
                embedded_services(
                    settings.embedded_dir, redis=redis_url is None, postgres=database_url is None
                )
            )
            redis_url = redis_url or urls.redis_url
            database_url = database_url or urls.database_url
        assert redis_url is not None and database_url is not None
        return redis_url, database_url

    async def _start_roles(self, tg: TaskGroup) -> list[_Server]:
        settings, keys = self.settings, self.keys
        assert self.redis is not None and self.db is not None and self.plugins is not None
        servers: list[_Server] = []
        if "worker" in self.roles:
            await claim_node_name(self.redis, keys, settings.node, interval=self.report_interval_s)
            context = self._handler_context()
            self.emitter = context.emitter
            restored = await context.registry.restore_if_lost()
            if restored:
                log.warning(
                    "Installed-plugin registry was missing in Redis; restored %d entries from "
                    "Postgres",
                    restored,
                )
            await tg.start(context.emitter.pipeline.run)
            self.lifecycle = Lifecycle(
                self.redis,
                keys,
                context.local,
                self.plugins,
                node=settings.node,
                drain_timeout=settings.task_timeout + 5,
                reconcile_every=self.reconcile_interval_s,
                outage=self.outages.redis,
            )
            await tg.start(self.lifecycle.run)
            tg.start_soon(
                partial(
                    run_reports,
                    self.redis,
                    keys,
                    node=settings.node,
                    version=__version__,
                    snapshot=self.plugins.snapshot,
                    interval=self.report_interval_s,
                )
            )
            dispatcher = Dispatcher(context)
            limits = {keys.install: settings.install_concurrency, keys.tasks: settings.worker_count}
            for stream, concurrency in limits.items():
                consumer = StreamConsumer(
                    self.redis,
                    stream=stream,
                    group=WORKERS_GROUP,
                    consumer=settings.node,
                    handler=dispatcher,
                    concurrency=concurrency,
                    takeover_after_s=settings.takeover_after,
                    keepalive_s=settings.keepalive_interval,
                    max_deliveries=settings.max_deliveries,
                    on_dead=dispatcher.dead_letter,
                    outage=self.outages.redis,
                )
                self.consumers.append(consumer)
                await tg.start(_run_consumer, consumer, self.shutdown_grace_s)
        else:
            for stream in keys.command_streams:
                await ensure_group(self.redis, stream, WORKERS_GROUP)
        if "projector" in self.roles:
            projector = Projector(self.redis, self.db, keys, settings.node, metrics=self.metrics)
            tg.start_soon(projector.run)
            tg.start_soon(
                partial(
                    run_retention,
                    self.redis,
                    self.db,
                    keys,
                    retention_s=settings.stream_retention,
                    outages=self.outages,
                )
            )
        if "api" in self.roles:
            from plugind.http.read_api import create_read_app

            app = create_read_app(
                redis=self.redis,
                pool=self.db,
                keys=keys,
                version=__version__,
                outages=self.outages,
                # a process without the worker role runs no plugin: its pool would look idle
                plugin_pool=self.plugins if "worker" in self.roles else None,
                api_key=settings.api_key,
                extra_routes=self._dify_routes(),
                metrics=self.metrics,
                node=settings.node,
            )
            servers.append(await self._serve(tg, "api", app, settings.http_port))
            if not settings.api_key:
                log.warning(
                    "PLUGIND_API_KEY is not set: the Dify daemon API and the tenant read routes "
                    "on port %d answer 401",
                    settings.http_port,
                )
        if "gateway" in self.roles:
            if settings.api_key:
                from plugind.http.gateway import create_gateway_app

                app = create_gateway_app(
                    redis=self.redis,
                    pool=self.db,
                    keys=keys,
                    settings=settings,
                    outages=self.outages,
                )
                servers.append(await self._serve(tg, "gateway", app, settings.gateway_port))
            elif "gateway" in self.roles and self.roles != ALL_ROLES:
                raise ConfigError("PLUGIND_API_KEY must be set to run the gateway role")
            else:
                log.warning("Write gateway not started: PLUGIND_API_KEY is not set")
        return servers

    def _dify_routes(self) -> list[Any]:
        """The Dify daemon API (``/plugin/{tenant}/…``): the one place the core imports it."""
        from plugind.dify.app import dify_routes
        from plugind.dify.deps import DifyDeps

        assert self.redis is not None and self.db is not None
        settings = self.settings
        return dify_routes(
            DifyDeps(
                redis=self.redis,
                keys=self.keys,
                pool=self.db,
                settings=settings,
                signature_keys=tuple(load_public_keys(settings.signature_public_keys)),
                inner_api=self.inner_api,
            )
        )

    def _handler_context(self) -> HandlerContext:
        settings, keys = self.settings, self.keys
        assert self.redis is not None and self.db is not None and self.plugins is not None
        outages = self.outages
        emitter = Emitter(self.redis, keys, dedupe_ttl=settings.dedupe_ttl, outage=outages.redis)
        signature_keys: tuple[bytes, ...] = ()
        if settings.verify_signature:
            signature_keys = tuple(load_public_keys(settings.signature_public_keys))
        return HandlerContext(
            settings=settings,
            redis=self.redis,
            db=self.db,
            keys=keys,
            emitter=emitter,
            events=EventFactory(settings.node),
            registry=Registry(
                self.redis, keys, self.db, emitter.pipeline, postgres=outages.postgres
            ),
            local=LocalPlugins(settings, self.db, postgres=outages.postgres),
            plugins=self.plugins,
            signature_keys=signature_keys,
            outages=outages,
            backwards=Relay(
                permissions=Permissions(self.db),
                storage=PluginStorage(self.db),
                inner_api=self.inner_api,
                storage_max_size=settings.plugin_storage_max_size,
            ),
            metrics=self.metrics,
        )

    async def _serve(self, tg: TaskGroup, role: str, app: ASGIApp, port: int) -> _Server:
        config = uvicorn.Config(
            HttpMetrics(app, self.metrics, server=role),
            host=self.settings.http_host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        server = _Server(config)
        server.finished = anyio.Event()
        tg.start_soon(server.run_until_exit)
        with anyio.fail_after(10):
            while not server.started:
                if server.should_exit:
                    raise ConfigError(f"{role}: could not listen on port {port}")
                await anyio.sleep(0.01)
        self.ports[role] = server.servers[0].sockets[0].getsockname()[1]
        return server

    def _log_started(self) -> None:
        ports = sorted(self.ports.values())
        where = (
            f" on ports {ports[0]}-{ports[-1]}"
            if len(ports) > 1
            else f" on port {ports[0]}"
            if ports
            else ""
        )
        log.info(
            "Plugin daemon started successfully%s (roles: %s, node: %s, namespace: %s)",
            where,
            ",".join(self.roles),
            self.settings.node,
            self.settings.namespace,
        )

    async def _watch_dependencies(self) -> None:
        """Ping Redis and Postgres every couple of seconds, for the outage trackers.

        The roles report what they meet, but a node whose roles leave a dependency idle (a
        worker and Postgres, say) would otherwise neither log that it went away nor notice
        that it came back, and ``/metrics`` would miscount the outage's length.
        """
        assert self.redis is not None and self.db is not None
        redis, db, outages = self.redis, self.db, self.outages
        checks = self.metrics.health_checks
        slot = self.slot
        while True:
            if slot is not None and slot.cluster:
                with contextlib.suppress(Exception), anyio.move_on_after(WATCH_INTERVAL_S):
                    await slot.follow()
            ok = await _probe(redis.ping, outages.redis.ok, outages.redis.failed, is_redis_outage)
            checks.labels("redis", "ok" if ok else "failed").inc()
            ok = await _probe(
                lambda: db.fetchval("SELECT 1", timeout=WATCH_INTERVAL_S),
                outages.postgres.ok,
                outages.postgres.failed,
                is_postgres_outage,
            )
            checks.labels("postgres", "ok" if ok else "failed").inc()
            await anyio.sleep(WATCH_INTERVAL_S)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("Received %s", signal.Signals(signum).name)
                if self._stop.is_set():
                    raise KeyboardInterrupt  # second signal: stop now
                self.stop()


async def _run_consumer(
    consumer: StreamConsumer, grace_s: float, *, task_status: TaskStatus[None]
) -> None:
    await consumer.run(grace_s=grace_s, task_status=task_status)


async def _probe(
    check: Callable[[], Awaitable[Any]],
    ok: Callable[[], None],
    failed: Callable[[BaseException], None],
    is_outage: Callable[[BaseException], bool],
) -> bool:
    """One bounded check of a dependency, reported to its tracker (``ok`` or ``failed``);
    returns whether it answered."""
    try:
        with anyio.fail_after(WATCH_INTERVAL_S):
            await check()
    except TimeoutError:
        failed(TimeoutError(f"no answer within {WATCH_INTERVAL_S:g}s"))
        return False
    except Exception as exc:
        if is_outage(exc):
            failed(exc)
        else:
            log.warning("Dependency check failed: %r", exc)
        return False
    ok()
    return True


async def _shielded(close: Any) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(15):
        await close()


async def _until_up(what: str, url: str, timeout: float, connect: Callable[[], Awaitable[T]]) -> T:
    """``connect()`` until it works or ``timeout`` runs out: services may start after us."""
    deadline = anyio.current_time() + timeout
    delay = 0.5
    while True:
        try:
            return await connect()
        except ConfigError:
            raise
        except Exception as exc:
            if anyio.current_time() + delay > deadline:
                raise ConfigError(f"{what}: cannot connect to {mask_url(url)}: {exc}") from exc
            log.warning("Waiting for %s at %s: %s", what, mask_url(url), exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _connect_redis(url: str, timeout: float) -> aioredis.Redis:
    async def connect() -> aioredis.Redis:
        # A couple of quick retries on a fresh connection absorb the stale pooled connections a
        # Redis restart leaves behind (from_url gives none by default); longer outages are the
        # roles' business (plugind.outage).
        client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            health_check_interval=30,
            socket_keepalive=True,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        try:
            info: dict[str, Any] = await client.info("server")
        except BaseException:
            await client.aclose()
            raise
        version = str(info.get("redis_version", "0"))
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parts < MIN_REDIS:
            await client.aclose()
            raise ConfigError(f"REDIS_URL: Redis {version} is too old; plugind needs Redis >= 6.2")
        log.info("Connected to Redis at %s (version %s)", mask_url(url), version)
        return client

    return await _until_up("REDIS_URL", url, timeout, connect)


async def _connect_postgres(url: str, timeout: float, schema: str) -> asyncpg.Pool:
    async def connect() -> asyncpg.Pool:
        # min_size=0: asyncpg keeps no connection floor, so while Postgres is down it does not
        # log a traceback every few seconds trying to restore one ("Failed to restore the pool
        # connection floor"); the daemon's own watch reports the outage once instead.
        try:
            pool = await create_pool(url, schema=schema, min_size=0, max_size=10, timeout=10)
            try:
                await pool.fetchval("SELECT 1")  # with no floor, nothing has connected yet
            except BaseException:
                await pool.close()
                raise
        except asyncpg.InvalidCatalogNameError:
            # as Dify's daemon does with its `dify_plugin`: a fresh Dify has not made it yet
            await _create_database(url)
            pool = await create_pool(url, schema=schema, min_size=0, max_size=10, timeout=10)
        log.info("Database connection established: %s (schema %s)", mask_url(url), schema)
        return pool

    return await _until_up("DATABASE_URL", url, timeout, connect)


async def _create_database(url: str) -> None:
    """Create the database ``url`` names, connecting to the server's ``postgres`` database."""
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")), timeout=10)
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
        log.warning("Created database %s (it did not exist)", name)
    except asyncpg.DuplicateDatabaseError:
        pass  # another node made it meanwhile
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def running_daemon(
    settings: Settings, roles: tuple[str, ...] = ALL_ROLES, **options: Any
) -> AsyncIterator[Daemon]:
    """Run a daemon in the background of the current task (tests, embedding); stop on exit."""
    daemon = Daemon(settings, roles=roles, handle_signals=False, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.stop()
