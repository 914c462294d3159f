"""uninstall: drop the tenant's plugin; stop its processes when no tenant uses that version."""

from __future__ import annotations

import logging

from plugind.bus.delivery import Delivery
from plugind.bus.emit import RegistryChange
from plugind.handlers.context import HandlerContext
from plugind.handlers.rejection import reject
from plugind.messages import ErrorInfo, UninstallCommand, Uninstalled

log = logging.getLogger(__name__)


async def handle_uninstall(ctx: HandlerContext, delivery: Delivery, cmd: UninstallCommand) -> None:
    identifier = await ctx.registry.installed(cmd.tenant_id, cmd.plugin_id)
    if identifier is None:
        await reject(
            ctx,
            delivery,
            ErrorInfo(
                "not_installed",
                f"plugin {cmd.plugin_id} is not installed for tenant {cmd.tenant_id}",
            ),
            request_id=cmd.request_id,
            tenant_id=cmd.tenant_id,
        )
        return
    committed = await ctx.emitter.terminal(
        delivery,
        ctx.events(
            Uninstalled,
            request_id=cmd.request_id,
            tenant_id=cmd.tenant_id,
            plugin_id=cmd.plugin_id,
            identifier=identifier,
        ),
        registry=RegistryChange("del", cmd.tenant_id, cmd.plugin_id),
    )
    if committed is None:
        return
    log.info(
        "Plugin uninstalled: %s, tenant=%s, request_id=%s",
        identifier,
        cmd.tenant_id,
        cmd.request_id,
    )
    if not await ctx.registry.in_use(identifier):
        await ctx.plugins.stop(identifier)
