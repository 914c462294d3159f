"""uninstall: drop the tenant's plugin; stop its processes when no tenant uses that version."""

from __future__ import annotations

import logging

from plugind.bus.delivery import Delivery
from plugind.handlers.context import HandlerContext
from plugind.handlers.decide import uninstall
from plugind.handlers.finish import finish
from plugind.messages import UninstallCommand

log = logging.getLogger(__name__)


async def handle_uninstall(ctx: HandlerContext, delivery: Delivery, cmd: UninstallCommand) -> None:
    installed = await ctx.registry.installed(cmd.tenant_id, cmd.plugin_id)
    await finish(ctx, delivery, uninstall(ctx.events, cmd, delivery, installed=installed), log)
