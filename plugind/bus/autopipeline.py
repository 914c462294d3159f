"""Commands issued at the same time travel to Redis together.

Dozens of handlers run at once, each sending a few small commands. Sent one by one, every
command costs a socket write and a wake-up, and under load those system calls, not Redis, are
what limits a node. Here a caller queues its command and awaits the reply; one flusher sends
everything queued as one pipeline (no MULTI: the commands stay independent), then what queued
meanwhile, and so on. An idle node sends each command at once, so nothing waits for a batch to
fill; a busy one sends fewer, larger writes.

Only short, non-blocking commands belong here: a blocking ``XREADGROUP`` would hold up every
command queued behind it.

A command that meets a Redis outage (dropped connection, Redis restarting or loading) is sent
again: at once the first time (most often one stale pooled connection after a restart), then
with a capped backoff for as long as Redis stays away, each outage logged once through
:mod:`plugind.outage`. A handler's commit therefore ends its request within about a second of
Redis coming back, instead of leaving the entry for reclaim, which is meant for dead nodes.
Everything sent through here must be safe to repeat, since a dropped connection leaves unknown
whether Redis ran it: reads, ``XACK``, the terminal and dead-letter scripts (gated by the done
marker and by ``XACK``, see ``bus.scripts``), and progress events (a repeat has the same
``event_id``, which the projector logs once).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from redis.exceptions import NoScriptError

from plugind.outage import Dependency, is_redis_outage, retry_redis

log = logging.getLogger(__name__)

MAX_BATCH = 512

Command = tuple[Any, ...]
_Call = tuple[list[Any], list[Any], "asyncio.Future[Any]"]


@dataclass(frozen=True, eq=False)
class BatchedScript:
    """A script that serves many callers in one call (see :meth:`AutoPipeline.call_batched`).

    Its KEYS and ARGV are each caller's ``keys_per_call`` keys and ``args_per_call`` arguments
    in turn, and it returns a list with one reply per caller, in the same order.
    """

    source: str
    keys_per_call: int
    args_per_call: int
    max_calls: int = 64
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


#: A test's stand-in for a failing network: called with each command and ``False`` before it is
#: sent, and with ``True`` after Redis ran it. An exception it returns is what the command's
#: caller gets instead (before: the command never reached Redis; after: it ran, but the reply was
#: lost, the ambiguous case a retry must survive).
FaultHook = Callable[[Command, bool], BaseException | None]


class AutoPipeline:
    def __init__(self, redis: aioredis.Redis, *, outage: Dependency | None = None) -> None:
        self._redis = redis
        self._queue: list[tuple[Command, asyncio.Future[Any]]] = []
        self._wakeup = anyio.Event()
        self._running = False
        self._batched: dict[BatchedScript, list[_Call]] = {}
        self.outage = outage or Dependency("Redis")
        self.fault: FaultHook | None = None
        self._scripts_ran = False
        self._cache_loss_logged = -60.0
        self.flushes = 0
        self.commands = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Flush queued commands until cancelled; commands queued then fail with the cancel."""
        self._running = True
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                while self._queue or self._batched:
                    batch = self._queue[:MAX_BATCH]
                    del self._queue[:MAX_BATCH]
                    await self._flush(batch + self._merged_calls())
        finally:
            self._running = False
            futures = [future for _command, future in self._queue]
            futures += [future for calls in self._batched.values() for *_, future in calls]
            for future in futures:
                if not future.done():
                    future.cancel()
            self._queue.clear()
            self._batched.clear()

    async def execute(self, *command: Any) -> Any:
        """Send ``command`` (as for ``execute_command``) with whatever else is queued.

        Retried through Redis outages (see the module doc); other errors reach the caller.
        """
        return await retry_redis(lambda: self._send(command), self.outage)

    def submit(self, *command: Any) -> Reply:
        """Queue ``command`` now and return its reply to await later (as :meth:`execute`).

        The command leaves in order with everything queued before and after it, so a caller can
        send two commands in one round trip, or overlap a write with other work, and await the
        replies when it needs them. Awaiting retries it through outages like :meth:`execute`;
        a reply never awaited is dropped silently.
        """
        first: asyncio.Future[Any] | None = None
        if self._running:
            first = asyncio.get_running_loop().create_future()
            first.add_done_callback(_consume)
            self._queue.append((command, first))
            self._wakeup.set()
        return Reply(self, command, first)

    async def call_batched(self, script: BatchedScript, keys: list[Any], args: list[Any]) -> Any:
        """Run ``script`` for this caller, in one call with the other callers queued meanwhile.

        Returns this caller's reply. Retried through outages like :meth:`execute` (so the
        script, for every caller, must be safe to repeat), and run from source when Redis lost
        its script cache, as :meth:`evalsha` does.
        """

        async def attempt() -> Any:
            try:
                reply = await self._call_batched_once(script, keys, args)
            except NoScriptError:
                self._note_lost_scripts()
                reply = (await self._send(("EVAL", script.source, len(keys), *keys, *args)))[0]
            self._scripts_ran = True
            return reply

        return await retry_redis(attempt, self.outage)

    async def _call_batched_once(
        self, script: BatchedScript, keys: list[Any], args: list[Any]
    ) -> Any:
        if not self._running:
            return (await self._send_now(("EVALSHA", script.sha, len(keys), *keys, *args)))[0]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._batched.setdefault(script, []).append((keys, args, future))
        self._wakeup.set()
        return await future

    def _merged_calls(self) -> list[tuple[Command, asyncio.Future[Any]]]:
        """One command per batched script for the calls queued (up to its ``max_calls``)."""
        merged: list[tuple[Command, asyncio.Future[Any]]] = []
        for script in list(self._batched):
            calls = self._batched[script]
            taken, rest = calls[: script.max_calls], calls[script.max_calls :]
            if rest:
                self._batched[script] = rest
            else:
                del self._batched[script]
            keys = [key for call_keys, _args, _future in taken for key in call_keys]
            args = [arg for _keys, call_args, _future in taken for arg in call_args]
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.add_done_callback(partial(_distribute, [f for *_, f in taken]))
            merged.append((("EVALSHA", script.sha, len(keys), *keys, *args), future))
        return merged

    def _note_lost_scripts(self) -> None:
        now = anyio.current_time()
        # a first use is no news; a loss after scripts ran is, once per restart
        if self._scripts_ran and now - self._cache_loss_logged > 60:
            self._cache_loss_logged = now
            log.info("Redis lost its script cache; running scripts from source")

    async def evalsha(self, sha: str, source: str, keys: list[Any], args: list[Any]) -> Any:
        """Run a script by its sha, retried through outages like :meth:`execute`.

        If Redis lost its script cache (a restart, ``SCRIPT FLUSH``) the same attempt falls back
        to ``EVAL`` with the source, which also caches the script again for the next EVALSHA: one
        more round trip on the same path as every other command, rather than a ``SCRIPT LOAD``
        on a connection of its own that may be a stale one from before the restart.
        """
        arity = (len(keys), *keys, *args)

        async def attempt() -> Any:
            try:
                result = await self._send(("EVALSHA", sha, *arity))
            except NoScriptError:
                self._note_lost_scripts()
                return await self._send(("EVAL", source, *arity))
            self._scripts_ran = True
            return result

        return await retry_redis(attempt, self.outage)

    async def _send(self, command: Command) -> Any:
        """One attempt: queue ``command`` for the flusher, or send it now if none runs."""
        if not self._running:
            return await self._send_now(command)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((command, future))
        self._wakeup.set()
        return await future

    async def _send_now(self, command: Command) -> Any:
        fault = self.fault
        if fault is not None and (error := fault(command, False)) is not None:
            raise error
        result = await self._redis.execute_command(*command)  # type: ignore[no-untyped-call]
        if fault is not None and (error := fault(command, True)) is not None:
            raise error
        return result

    async def _flush(self, batch: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        self.flushes += 1
        self.commands += len(batch)
        fault = self.fault
        if fault is not None:
            batch = _fail_before_send(batch, fault)
            if not batch:
                return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for command, _future in batch:
                    pipe.execute_command(*command)
                results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            # The connection failed (every caller of this batch hears it), or we are cancelled
            # (the callers are too; nobody may be left waiting for a reply that never comes).
            for _command, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        if fault is not None:
            results = [
                fault(command, True) or result
                for (command, _future), result in zip(batch, results, strict=True)
            ]
        for (_command, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


class Reply:
    """The reply to a command sent with :meth:`AutoPipeline.submit`, awaitable once."""

    __slots__ = ("_command", "_first", "_pipeline")

    def __init__(
        self, pipeline: AutoPipeline, command: Command, first: asyncio.Future[Any] | None
    ) -> None:
        self._pipeline, self._command, self._first = pipeline, command, first

    def __await__(self) -> Generator[Any, None, Any]:
        return self._settle().__await__()

    async def _settle(self) -> Any:
        first, self._first = self._first, None
        if first is not None:
            try:
                # The copy already sent. Its success says nothing of Redis now (the reply may have
                # come long before): only a retry below reports to the outage tracker.
                return await first
            except Exception as exc:
                if not is_redis_outage(exc):
                    raise
        pipeline, command = self._pipeline, self._command
        return await retry_redis(lambda: pipeline._send(command), pipeline.outage)


def _distribute(callers: list[asyncio.Future[Any]], merged: asyncio.Future[Any]) -> None:
    """Hand each caller of a merged script call its own reply (or the call's error)."""
    if merged.cancelled():
        for future in callers:
            if not future.done():
                future.cancel()
        return
    error = merged.exception()
    replies = merged.result() if error is None else None
    if error is None and (not isinstance(replies, list) or len(replies) != len(callers)):
        error = RuntimeError(f"a batched script answered {replies!r} to {len(callers)} calls")
    for index, future in enumerate(callers):
        if future.done():
            continue  # its caller was cancelled
        if error is not None:
            future.set_exception(error)
        else:
            assert replies is not None
            future.set_result(replies[index])


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a reply's error as seen: a reply nobody awaits must not be logged as lost."""
    if not future.cancelled():
        future.exception()


def _fail_before_send(
    batch: list[tuple[Command, asyncio.Future[Any]]], fault: FaultHook
) -> list[tuple[Command, asyncio.Future[Any]]]:
    """Fail the commands ``fault`` picks before they are sent; returns the rest."""
    kept = []
    for command, future in batch:
        error = fault(command, False)
        if error is None:
            kept.append((command, future))
        elif not future.done():
            future.set_exception(error)
    return kept
