"""``command.rejected``: the terminal event of a command that cannot be carried out as sent."""

from __future__ import annotations

import logging

from plugind.bus.codec import preview
from plugind.bus.delivery import Delivery
from plugind.handlers.context import HandlerContext
from plugind.messages import CommandRejected, ErrorInfo

log = logging.getLogger(__name__)


async def reject(
    ctx: HandlerContext,
    delivery: Delivery,
    error: ErrorInfo,
    *,
    request_id: str = "",
    tenant_id: str = "default",
) -> None:
    await ctx.emitter.terminal(
        delivery,
        ctx.events(
            CommandRejected,
            request_id=request_id,
            tenant_id=tenant_id,
            stream=delivery.stream,
            entry_id=delivery.entry_id,
            error=error,
            raw=preview(delivery.fields),
        ),
    )
    log.warning(
        "Command rejected: %s %s, request_id=%s, code=%s, error=%s",
        delivery.stream,
        delivery.entry_id,
        request_id or "-",
        error.code,
        error.message,
    )
