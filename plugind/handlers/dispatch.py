"""From a stream entry to the right handler: decode, de-duplicate, route, dead-letter.

Decoding failures and oversized entries end here with ``command.rejected``; the consumer never
sees an exception for bad input. Infrastructure failures (Redis or Postgres away) propagate, so
the entry stays pending and is retried, and after ``PLUGIND_MAX_DELIVERIES`` dead-lettered.
"""

from __future__ import annotations

import logging

import msgspec

from plugind.bus.delivery import Delivery
from plugind.handlers.context import HandlerContext
from plugind.handlers.decide import Refusal, dead_lettered, max_command_bytes, read_command
from plugind.handlers.finish import skip_duplicate, write
from plugind.handlers.install import handle_install
from plugind.handlers.rejection import reject
from plugind.handlers.task import handle_task
from plugind.handlers.uninstall import handle_uninstall
from plugind.messages import InstallCommand, TaskCommand, UninstallCommand

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, ctx: HandlerContext) -> None:
        self.ctx = ctx
        self.max_command_bytes = max_command_bytes(ctx.settings.max_package_size)

    async def __call__(self, delivery: Delivery) -> None:
        ctx = self.ctx
        cmd = read_command(delivery.fields, self.max_command_bytes)
        if isinstance(cmd, Refusal):
            await reject(
                ctx,
                delivery,
                cmd.error,
                request_id=cmd.request_id,
                tenant_id=cmd.tenant_id,
            )
            return
        if isinstance(cmd, TaskCommand):
            await handle_task(ctx, delivery, cmd)  # de-duplicates along with its first lookup
            return
        if await ctx.emitter.already_done(cmd.request_id):
            await skip_duplicate(ctx, delivery, cmd.request_id)
            return
        if isinstance(cmd, InstallCommand):
            await handle_install(ctx, delivery, cmd)
        elif isinstance(cmd, UninstallCommand):
            await handle_uninstall(ctx, delivery, cmd)

    async def dead_letter(self, delivery: Delivery) -> None:
        """Give up on an entry that failed ``PLUGIND_MAX_DELIVERIES`` times."""
        terminal = dead_lettered(self.ctx.events, delivery)
        event = terminal.event
        await self.ctx.emitter.dead_letter(delivery, event, error=msgspec.to_builtins(event.error))
        self.ctx.metrics.dead_letters.labels(delivery.stream).inc()
        write(log, terminal.logs)
