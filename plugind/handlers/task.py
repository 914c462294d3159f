"""task: resolve the plugin, run the request in a plugin process, emit the outcome."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from plugind.bus.delivery import Delivery
from plugind.errors import PlugindError
from plugind.handlers.context import HandlerContext
from plugind.handlers.timing import ms_since
from plugind.messages import (
    Event,
    TaskCommand,
    TaskFailed,
    TaskResult,
    TaskStarted,
    TaskSucceeded,
    TaskTimedOut,
)
from plugind.runtime.process import PluginRequest

log = logging.getLogger(__name__)


async def handle_task(ctx: HandlerContext, delivery: Delivery, cmd: TaskCommand) -> None:
    started = time.monotonic()
    events = ctx.events
    rid, tenant = cmd.request_id, cmd.tenant_id
    timeout = cmd.timeout_s or ctx.settings.task_timeout
    plugin_id = cmd.plugin_id
    outcome: Event
    try:
        plugin_id, identifier = await ctx.registry.resolve(tenant, cmd.plugin_id)
        await ctx.emitter.emit(
            events(
                TaskStarted,
                request_id=rid,
                tenant_id=tenant,
                plugin_id=plugin_id,
                identifier=identifier,
                access=cmd.access,
                action=cmd.action,
                attempt=delivery.deliveries,
            )
        )
        local = await ctx.local.ensure(identifier)
        chunks = await ctx.plugins.invoke(
            identifier,
            local.workdir,
            local.python,
            local.entrypoint,
            _request(cmd),
            timeout=timeout,
            on_chunk=_chunk_publisher(ctx, rid) if cmd.stream else None,
        )
        outcome = events(
            TaskSucceeded,
            request_id=rid,
            tenant_id=tenant,
            plugin_id=plugin_id,
            result=TaskResult(chunks=chunks),
            duration_ms=ms_since(started),
        )
    except PlugindError as exc:
        if exc.code == "timeout":
            outcome = events(
                TaskTimedOut,
                request_id=rid,
                tenant_id=tenant,
                plugin_id=plugin_id,
                timeout_s=timeout,
                duration_ms=ms_since(started),
            )
        else:
            outcome = events(
                TaskFailed,
                request_id=rid,
                tenant_id=tenant,
                plugin_id=plugin_id,
                error=exc.info(),
                duration_ms=ms_since(started),
            )
    committed = await ctx.emitter.terminal(delivery, outcome, output=cmd.stream)
    if committed is not None:
        _log_outcome(outcome, plugin_id, rid, timeout)


def _request(cmd: TaskCommand) -> PluginRequest:
    return PluginRequest(
        access=cmd.access,
        action=cmd.action,
        payload=cmd.payload,
        user_id=cmd.user_id,
        conversation_id=cmd.conversation_id,
        message_id=cmd.message_id,
        app_id=cmd.app_id,
        endpoint_id=cmd.endpoint_id,
        context=cmd.context,
    )


def _chunk_publisher(ctx: HandlerContext, request_id: str) -> Callable[[Any], Awaitable[None]]:
    async def publish(chunk: Any) -> None:
        await ctx.emitter.chunk(request_id, chunk)

    return publish


def _log_outcome(outcome: Event, plugin_id: str, request_id: str, timeout: float) -> None:
    duration_s = getattr(outcome, "duration_ms", 0.0) / 1000
    if isinstance(outcome, TaskSucceeded):
        status = "success"
    elif isinstance(outcome, TaskTimedOut):
        status = "timeout"
        log.warning(
            "Plugin task timeout: %s, request_id=%s, timeout=%gs", plugin_id, request_id, timeout
        )
    else:
        assert isinstance(outcome, TaskFailed)
        status = "failed"
        log.warning(
            "Plugin task failed: %s, request_id=%s, code=%s, error=%s",
            plugin_id,
            request_id,
            outcome.error.code,
            outcome.error.message,
        )
    log.info(
        "Plugin task executed: %s, request_id=%s, duration=%.3fs, status=%s",
        plugin_id,
        request_id,
        duration_s,
        status,
    )
