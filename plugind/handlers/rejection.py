"""``command.rejected``: the terminal event of a command that cannot be carried out as sent."""

from __future__ import annotations

import logging

from plugind.bus.delivery import Delivery
from plugind.handlers.context import HandlerContext
from plugind.handlers.decide import rejected
from plugind.handlers.finish import finish
from plugind.messages import ErrorInfo

log = logging.getLogger(__name__)


async def reject(
    ctx: HandlerContext,
    delivery: Delivery,
    error: ErrorInfo,
    *,
    request_id: str = "",
    tenant_id: str = "default",
) -> None:
    terminal = rejected(ctx.events, delivery, error, request_id=request_id, tenant_id=tenant_id)
    await finish(ctx, delivery, terminal, log)
