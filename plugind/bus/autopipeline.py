"""Commands issued at the same time travel to Redis together.

Dozens of handlers run at once, each sending a few small commands. Sent one by one, every
command costs a socket write and a wake-up, and under load those system calls, not Redis, are
what limits a node. Here a caller queues its command and awaits the reply; one flusher sends
everything queued as one pipeline (no MULTI: the commands stay independent), then what queued
meanwhile, and so on. An idle node sends each command at once, so nothing waits for a batch to
fill; a busy one sends fewer, larger writes.

Only short, non-blocking commands belong here: a blocking ``XREADGROUP`` would hold up every
command queued behind it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from redis.exceptions import NoScriptError

log = logging.getLogger("plugind.bus")

MAX_BATCH = 512

Command = tuple[Any, ...]


class AutoPipeline:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._queue: list[tuple[Command, asyncio.Future[Any]]] = []
        self._wakeup = anyio.Event()
        self._running = False
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
                while self._queue:
                    batch = self._queue[:MAX_BATCH]
                    del self._queue[:MAX_BATCH]
                    await self._flush(batch)
        finally:
            self._running = False
            for _command, future in self._queue:
                if not future.done():
                    future.cancel()
            self._queue.clear()

    async def execute(self, *command: Any) -> Any:
        """Send ``command`` (as for ``execute_command``) with whatever else is queued."""
        if not self._running:
            return await self._redis.execute_command(*command)  # type: ignore[no-untyped-call]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((command, future))
        self._wakeup.set()
        return await future

    async def evalsha(self, sha: str, source: str, keys: list[Any], args: list[Any]) -> Any:
        """EVALSHA, loading the script first if Redis lost it (restart, SCRIPT FLUSH)."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            return await self.execute(*command)
        except NoScriptError:
            await self._redis.script_load(source)
            return await self.execute(*command)

    async def _flush(self, batch: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        self.flushes += 1
        self.commands += len(batch)
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
        for (_command, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
