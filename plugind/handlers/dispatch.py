"""From a stream entry to the right handler: decode, de-duplicate, route, dead-letter.

Decoding failures and oversized entries end here with ``command.rejected``; the consumer never
sees an exception for bad input. Infrastructure failures (Redis or Postgres away) propagate, so
the entry stays pending and is retried, and after ``PLUGIND_MAX_DELIVERIES`` dead-lettered.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
import orjson

from plugind.bus.codec import CMD_FIELD, text
from plugind.bus.delivery import Delivery
from plugind.handlers.context import HandlerContext
from plugind.handlers.install import handle_install
from plugind.handlers.rejection import reject
from plugind.handlers.task import handle_task
from plugind.handlers.uninstall import handle_uninstall
from plugind.messages import (
    CommandDeadLettered,
    ErrorInfo,
    InstallCommand,
    TaskCommand,
    UninstallCommand,
    decode_command,
)

log = logging.getLogger(__name__)

_CMD = CMD_FIELD.encode()
_REQUEST_ID = re.compile(rb'"request_id"\s*:\s*"([^"\\]{1,128})"')
_TENANT_ID = re.compile(rb'"tenant_id"\s*:\s*"([^"\\]{1,128})"')


class Dispatcher:
    def __init__(self, ctx: HandlerContext) -> None:
        self.ctx = ctx
        # base64 inflates by 4/3; leave room for the envelope.
        self.max_command_bytes = ctx.settings.max_package_size * 4 // 3 + 64 * 1024

    async def __call__(self, delivery: Delivery) -> None:
        ctx = self.ctx
        raw = delivery.fields.get(_CMD)
        if raw is None:
            names = ", ".join(sorted(text(k) for k in delivery.fields)) or "none"
            await reject(
                ctx,
                delivery,
                ErrorInfo("malformed_command", f"entry has no `cmd` field (fields: {names})"),
            )
            return
        if len(raw) > self.max_command_bytes:
            rid, tenant = _best_effort_ids(raw[:4096])
            await reject(
                ctx,
                delivery,
                ErrorInfo(
                    "payload_too_large",
                    f"command is {len(raw)} bytes, over the {self.max_command_bytes}-byte limit",
                ),
                request_id=rid,
                tenant_id=tenant,
            )
            return
        try:
            cmd = decode_command(raw)
        except msgspec.DecodeError as exc:
            rid, tenant = _best_effort_ids(raw)
            await reject(
                ctx,
                delivery,
                ErrorInfo("malformed_command", str(exc)),
                request_id=rid,
                tenant_id=tenant,
            )
            return
        if await ctx.emitter.already_done(cmd.request_id):
            log.info(
                "Duplicate request_id=%s on %s %s: already ended, acknowledged",
                cmd.request_id,
                delivery.stream,
                delivery.entry_id,
            )
            await ctx.emitter.ack(delivery)
            return
        if isinstance(cmd, TaskCommand):
            await handle_task(ctx, delivery, cmd)
        elif isinstance(cmd, InstallCommand):
            await handle_install(ctx, delivery, cmd)
        elif isinstance(cmd, UninstallCommand):
            await handle_uninstall(ctx, delivery, cmd)

    async def dead_letter(self, delivery: Delivery) -> None:
        """Give up on an entry that failed ``PLUGIND_MAX_DELIVERIES`` times."""
        ctx = self.ctx
        rid, tenant = _best_effort_ids(delivery.fields.get(_CMD, b""))
        error = ErrorInfo(
            "max_deliveries_exceeded",
            f"delivered {delivery.deliveries} times without finishing; moved to dead letters",
        )
        event = ctx.events(
            CommandDeadLettered,
            request_id=rid,
            tenant_id=tenant,
            stream=delivery.stream,
            entry_id=delivery.entry_id,
            deliveries=delivery.deliveries,
            error=error,
        )
        await ctx.emitter.dead_letter(delivery, event, error=msgspec.to_builtins(error))
        log.error(
            "Command dead-lettered: %s %s, request_id=%s, deliveries=%d",
            delivery.stream,
            delivery.entry_id,
            rid or "-",
            delivery.deliveries,
        )


def _best_effort_ids(raw: bytes) -> tuple[str, str]:
    """``(request_id, tenant_id)`` from a command that failed to decode, where they are usable."""
    try:
        obj: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # cut or broken JSON (an oversized command is only looked at in part): look for the keys
        rid_match = _REQUEST_ID.search(raw)
        tenant_match = _TENANT_ID.search(raw)
        return (
            rid_match.group(1).decode() if rid_match else "",
            tenant_match.group(1).decode() if tenant_match else "default",
        )
    if not isinstance(obj, dict):
        return "", "default"
    rid = obj.get("request_id")
    tenant = obj.get("tenant_id")
    return (
        rid if isinstance(rid, str) and 0 < len(rid) <= 128 else "",
        tenant if isinstance(tenant, str) and 0 < len(tenant) <= 128 else "default",
    )
