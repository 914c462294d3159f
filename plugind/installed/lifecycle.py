"""Every node follows installs, upgrades and uninstalls: what one node is told, all do.

The node that handles an install or uninstall changes the ``installed`` registry in the same
atomic step as the terminal event (``bus.scripts``), then announces it on the pub/sub channel
``{ns}:lifecycle`` (:func:`announce`). Every worker node listens there and, for a plugin version
that no tenant has installed any more:

- waits for the requests running on it to finish (up to ``drain_timeout``; new requests for that
  version, which only a full identifier can still name, wait for the retirement and then build
  it again);
- stops its processes, and removes its folder and environment (:meth:`LocalPlugins.retire`).

An upgrade first starts the new version on every node that ran the old one, so the next request
finds it warm, then retires the old one the same way: in-flight requests of the old version
finish on it.

Pub/sub is a hint, not the source of truth: a node that misses an announcement (a Redis outage,
a crash of the announcing node between its commit and the announcement) catches up on its next
reconciliation (every ``reconcile_every`` seconds, at start and after an outage), which compares
the versions it has, in memory and on disk, with the registry. Reconciliation retires only
versions unused for ``idle_retire_s``, so a version a task named by full identifier, or an
install still under way, is left alone; at start, folders this node claims but does not run are
removed at once (old versions a node kept from before a restart).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import msgspec
import redis.asyncio as aioredis
from anyio.abc import TaskGroup, TaskStatus

from plugind.bus.codec import text
from plugind.bus.keys import Keys
from plugind.bus.nodes import read_reports
from plugind.installed.local_plugins import LocalPlugins, claim_name
from plugind.outage import Backoff, Dependency, is_redis_outage
from plugind.runtime.pool import PluginPool

log = logging.getLogger(__name__)

RECONCILE_EVERY_S: Final = 30.0
IDLE_RETIRE_S: Final = 600.0


class Note(msgspec.Struct, omit_defaults=True):
    """One announcement: a version now installed for some tenant, and one that may be unused."""

    installed: str | None = None
    retire: str | None = None
    node: str = ""


_decoder: Final = msgspec.json.Decoder(Note)


async def announce(redis: aioredis.Redis, keys: Keys, note: Note) -> None:
    """Tell every node (best effort: reconciliation covers a lost announcement)."""
    try:
        await redis.publish(keys.lifecycle, msgspec.json.encode(note))
    except Exception as exc:
        if not is_redis_outage(exc):
            raise
        log.warning("Could not announce %s to the other nodes: %s", note, exc)


class Lifecycle:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        local: LocalPlugins,
        pool: PluginPool,
        *,
        node: str,
        drain_timeout: float,
        reconcile_every: float = RECONCILE_EVERY_S,
        idle_retire_s: float = IDLE_RETIRE_S,
        outage: Dependency | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._local = local
        self._pool = pool
        self._node = node
        self._drain_timeout = drain_timeout
        self._reconcile_every = reconcile_every
        self._idle_retire_s = idle_retire_s
        self._outage = outage or Dependency("Redis")
        self._retiring: set[str] = set()
        self._tg: TaskGroup | None = None
        self.retired: list[str] = []  # what this node retired, in order (tests, status)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                await self.reconcile(at_start=True)
            except Exception as exc:
                if not is_redis_outage(exc):
                    raise
                self._outage.failed(exc)
            task_status.started()
            tg.start_soon(self._listen)
            while True:
                await anyio.sleep(self._reconcile_every)
                try:
                    await self.reconcile()
                except Exception as exc:
                    if not is_redis_outage(exc):
                        raise
                    self._outage.failed(exc)

    # ------------------------------------------------------------------ following

    async def _listen(self) -> None:
        backoff = Backoff(0.1, 1.0)
        missed = False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.lifecycle)
                if missed:  # announcements may have gone by while we were not subscribed
                    await self.reconcile()
                    missed = False
                backoff.reset()
                while True:
                    message: Any = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._follow(message["data"])
            except Exception as exc:
                if not is_redis_outage(exc):
                    raise
                self._outage.failed(exc)
                missed = True
                await backoff.sleep()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _follow(self, data: bytes) -> None:
        try:
            note = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.warning("Ignoring an unreadable lifecycle announcement %r: %s", data[:200], exc)
            return
        log.debug("Lifecycle announcement from %s: %s", note.node, note)
        if note.retire is None:
            return
        upgrade_to = note.installed if note.retire in self._local.ready else None
        self._start_retire(note.retire, warm=upgrade_to)

    # ------------------------------------------------------------------ reconciling

    async def reconcile(self, *, at_start: bool = False) -> list[str]:
        """Retire every version this node has that no tenant has installed and nobody used for
        ``idle_retire_s`` (at start: that this node does not run at all); returns them."""
        installed = await self._installed()
        have = set(self._local.ready) | set(await anyio.to_thread.run_sync(self._local.claimed))
        stale = sorted(
            identifier
            for identifier in have - installed
            if self._local.idle_for(identifier) >= (0 if at_start else self._idle_retire_s)
        )
        for identifier in stale:
            self._start_retire(identifier)
        return stale

    async def _installed(self) -> set[str]:
        values: list[Any] = await self._redis.hvals(self._keys.installed)
        return {text(v) for v in values}

    def _start_retire(self, identifier: str, *, warm: str | None = None) -> None:
        if identifier in self._retiring or self._tg is None:
            return
        self._retiring.add(identifier)
        self._tg.start_soon(self._retire, identifier, warm)

    async def _retire(self, identifier: str, warm: str | None) -> None:
        try:
            if warm is not None:
                await self._warm(warm)
            retired = await self._with_redis(
                lambda: self._local.retire(
                    identifier,
                    stop=self._pool.stop,
                    still_wanted=lambda: self._wanted(identifier),
                    drain_timeout=self._drain_timeout,
                    live_claims=self._live_claims,
                )
            )
            if retired:
                self.retired.append(identifier)
        except Exception:
            log.exception("Retiring plugin %s on this node failed; retried later", identifier)
        finally:
            self._retiring.discard(identifier)

    async def _warm(self, identifier: str) -> None:
        """Start ``identifier`` here before its predecessor goes (an upgrade)."""
        try:
            async with self._local.use(identifier) as plugin:
                await self._pool.start(
                    plugin.identifier, plugin.workdir, plugin.python, plugin.entrypoint
                )
        except Exception as exc:  # the first request will try again, and say why
            log.warning("Could not start %s ahead of its first request: %s", identifier, exc)
        else:
            log.info("Plugin %s started on this node (upgrade)", identifier)

    async def _wanted(self, identifier: str) -> bool:
        return identifier in await self._installed()

    async def _live_claims(self) -> set[str]:
        namespace = self._keys.namespace
        reports = await read_reports(self._redis, self._keys)
        return {claim_name(namespace, r.node) for r in reports} | {self._local.claim}

    async def _with_redis(self, step: Callable[[], Awaitable[bool]]) -> bool:
        backoff = Backoff(0.1, 1.0)
        while True:
            try:
                return await step()
            except Exception as exc:
                if not is_redis_outage(exc):
                    raise
                self._outage.failed(exc)
                await backoff.sleep()
