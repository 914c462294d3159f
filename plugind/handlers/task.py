"""task: resolve the plugin, run the request in a plugin process, emit the outcome."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from plugind.bus.autopipeline import Reply
from plugind.bus.delivery import Delivery
from plugind.errors import PlugindError
from plugind.handlers.context import HandlerContext
from plugind.handlers.decide import (
    backwards_invoked,
    caller,
    plugin_request,
    task_ended,
    task_started,
    task_timeout,
)
from plugind.handlers.finish import finish, skip_duplicate, write
from plugind.handlers.timing import ms_since
from plugind.messages import TaskCommand
from plugind.runtime.backwards import Backwards, BackwardsCall, BackwardsOutcome, BackwardsReply

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
        async with ctx.local.use(identifier) as local:  # a retirement waits for it
            outcome = await ctx.plugins.invoke(
                identifier,
                local.workdir,
                local.python,
                local.entrypoint,
                plugin_request(cmd),
                timeout=timeout,
                on_chunk=_chunk_publisher(ctx, cmd.request_id) if cmd.stream else None,
                backwards=_backwards(ctx, cmd, plugin_id=plugin_id, identifier=identifier),
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
    if await finish(ctx, delivery, ended, log, output=cmd.stream):
        ctx.metrics.task_ended(plugin_id, cmd.action, ended.event)


def _chunk_publisher(ctx: HandlerContext, request_id: str) -> Callable[[Any], Awaitable[None]]:
    async def publish(chunk: Any) -> None:
        await ctx.emitter.chunk(request_id, chunk)

    return publish


# How long the audit event of a backwards call may wait for Redis once its session has ended.
AUDIT_WRITE_S = 5.0


def _backwards(
    ctx: HandlerContext, cmd: TaskCommand, *, plugin_id: str, identifier: str
) -> Backwards | None:
    """The task's plugin calling back into Dify: through the relay, each call an event."""
    relay = ctx.backwards
    if relay is None:
        return None  # the process refuses them, saying so
    who = caller(cmd, plugin_id=plugin_id, identifier=identifier)

    async def serve(call: BackwardsCall, reply: BackwardsReply) -> None:
        started = time.monotonic()
        outcome: BackwardsOutcome | None = None
        try:
            outcome = await relay(who, call, reply)
            await reply.end()  # the plugin goes on; the audit event needs no answer
        finally:
            if outcome is None:  # cancelled with its session, or the relay broke
                outcome = BackwardsOutcome(
                    call.kind, "", "error", ms_since(started), "the call did not finish"
                )
            event, line = backwards_invoked(ctx.events, cmd, outcome, plugin_id=plugin_id)
            with anyio.CancelScope(shield=True), anyio.move_on_after(AUDIT_WRITE_S):
                await ctx.emitter.emit(event)
            write(log, (line,))

    return serve
