"""task: resolve the plugin, run the request in a plugin process, emit the outcome."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from plugind.bus.autopipeline import Reply
from plugind.bus.delivery import Delivery
from plugind.errors import PlugindError
from plugind.handlers.context import HandlerContext
from plugind.handlers.decide import plugin_request, task_ended, task_started, task_timeout
from plugind.handlers.finish import finish, skip_duplicate
from plugind.handlers.timing import ms_since
from plugind.messages import TaskCommand

log = logging.getLogger(__name__)


async def handle_task(ctx: HandlerContext, delivery: Delivery, cmd: TaskCommand) -> None:
    """Run one task command (the dispatcher leaves its de-duplication to us).

    Round trips are what a task waits for, so they overlap: the done-marker check and the
    plugin lookup travel to Redis together, and ``task.started`` is sent while the plugin runs
    (its reply is awaited before the terminal commit, which therefore follows it in the
    stream, as before).
    """
    started = time.monotonic()
    timeout = task_timeout(cmd, ctx.settings.task_timeout)
    plugin_id = cmd.plugin_id
    outcome: list[Any] | PlugindError
    done = ctx.emitter.done_soon(cmd.request_id)
    try:
        resolved: tuple[str, str] | PlugindError = await ctx.registry.resolve(
            cmd.tenant_id, cmd.plugin_id
        )
    except PlugindError as exc:
        resolved = exc
    if await done:
        await skip_duplicate(ctx, delivery, cmd.request_id)
        return
    announced: Reply | None = None
    try:
        if isinstance(resolved, PlugindError):
            raise resolved
        plugin_id, identifier = resolved
        announced = ctx.emitter.emit_soon(
            task_started(
                ctx.events,
                cmd,
                plugin_id=plugin_id,
                identifier=identifier,
                attempt=delivery.deliveries,
            )
        )
        local = await ctx.local.ensure(identifier)
        outcome = await ctx.plugins.invoke(
            identifier,
            local.workdir,
            local.python,
            local.entrypoint,
            plugin_request(cmd),
            timeout=timeout,
            on_chunk=_chunk_publisher(ctx, cmd.request_id) if cmd.stream else None,
        )
    except PlugindError as exc:
        outcome = exc
    if announced is not None:
        await announced
    ended = task_ended(
        ctx.events,
        cmd,
        outcome,
        plugin_id=plugin_id,
        timeout_s=timeout,
        duration_ms=ms_since(started),
    )
    await finish(ctx, delivery, ended, log, output=cmd.stream)


def _chunk_publisher(ctx: HandlerContext, request_id: str) -> Callable[[Any], Awaitable[None]]:
    async def publish(chunk: Any) -> None:
        await ctx.emitter.chunk(request_id, chunk)

    return publish
