"""Carry out a :class:`~plugind.handlers.decide.Terminal`: commit, log, announce.

Every handler ends a request the same way, so the order of these steps (the atomic commit
first; logs and announcing a registry change to every node only once it is ours) lives in one
place.
"""

from __future__ import annotations

import logging
from typing import Any

from plugind.bus.delivery import Delivery
from plugind.handlers.context import HandlerContext
from plugind.handlers.decide import LogLine, Terminal
from plugind.installed.lifecycle import Note, announce

log = logging.getLogger(__name__)


async def finish(
    ctx: HandlerContext,
    delivery: Delivery,
    terminal: Terminal[Any],
    logger: logging.Logger,
    *,
    output: bool = False,
) -> bool:
    """Commit ``terminal``; ``False`` if a duplicate had already ended the request.

    ``logger`` is the handler's, so log lines keep naming the handler that wrote them.
    ``output`` also closes the request's live-output stream (tasks sent with ``stream``).
    """
    committed = await ctx.emitter.terminal(
        delivery, terminal.event, registry=terminal.registry, output=output
    )
    if committed is not None or terminal.always_log:
        write(logger, terminal.logs)
    if committed is None:
        return False
    if terminal.registry is not None:
        # every node (this one included) drains, stops and removes a version no tenant has any
        # more, and warms the new one of an upgrade: see plugind.installed.lifecycle
        installed = terminal.registry.identifier if terminal.registry.op == "set" else None
        await announce(
            ctx.redis,
            ctx.keys,
            Note(installed=installed, retire=terminal.retire, node=ctx.settings.node),
        )
    return True


async def skip_duplicate(ctx: HandlerContext, delivery: Delivery, request_id: str) -> None:
    """Acknowledge a command whose request has already ended, without running it again."""
    log.info(
        "Duplicate request_id=%s on %s %s: already ended, acknowledged",
        request_id,
        delivery.stream,
        delivery.entry_id,
    )
    await ctx.emitter.ack(delivery)


def write(logger: logging.Logger, lines: tuple[LogLine, ...]) -> None:
    for line in lines:
        logger.log(line.level, line.message, *line.args)
