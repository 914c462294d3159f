"""task: resolve the plugin, run the request in a plugin process, emit the outcome."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from plugind.bus.delivery import Delivery
from plugind.errors import PlugindError
from plugind.handlers.context import HandlerContext
from plugind.handlers.decide import plugin_request, task_ended, task_started, task_timeout
from plugind.handlers.finish import finish
from plugind.handlers.timing import ms_since
from plugind.messages import TaskCommand

log = logging.getLogger(__name__)


async def handle_task(ctx: HandlerContext, delivery: Delivery, cmd: TaskCommand) -> None:
    started = time.monotonic()
    timeout = task_timeout(cmd, ctx.settings.task_timeout)
    plugin_id = cmd.plugin_id
    outcome: list[Any] | PlugindError
    try:
        plugin_id, identifier = await ctx.registry.resolve(cmd.tenant_id, cmd.plugin_id)
        await ctx.emitter.emit(
            task_started(
                ctx.events,
                cmd,
                plugin_id=plugin_id,
                identifier=identifier,
                attempt=delivery.deliveries,
            )
        )
        async with ctx.local.use(identifier) as local:  # a retirement waits for it
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
    ended = task_ended(
        ctx.events,
        cmd,
        outcome,
        plugin_id=plugin_id,
        timeout_s=timeout,
        duration_ms=ms_since(started),
    )
    if await finish(ctx, delivery, ended, log, output=cmd.stream):
        ctx.metrics.task_ended(plugin_id, cmd.action, ended.event)


def _chunk_publisher(ctx: HandlerContext, request_id: str) -> Callable[[Any], Awaitable[None]]:
    async def publish(chunk: Any) -> None:
        await ctx.emitter.chunk(request_id, chunk)

    return publish
