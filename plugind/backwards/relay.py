"""Serving a plugin's calls back into Dify: check, then relay to Dify or serve from storage.

For each call, in order:

1. a kind the SDK can send (:data:`plugind.backwards.kinds.KINDS`), else refused;
2. not from a model plugin (upstream: "you can not invoke dify from model");
3. allowed by the plugin's manifest (``resource.permission``), else refused with upstream's
   message: nothing leaves plugind;
4. ``storage`` is answered from plugind's own storage; every other kind is POSTed to Dify's
   inner API with ``tenant_id``, ``user_id`` and ``type`` set by plugind (never taken from the
   plugin), and each item of Dify's answer goes back to the plugin as it arrives.

Whatever happens the call gets an answer (an ``error`` says why), and the outcome is returned
for the task's ``task.backwards_invoked`` event.
"""

from __future__ import annotations

import binascii
import logging
import time
from typing import Any

import asyncpg

from plugind.backwards.errors import BackwardsError, StorageError
from plugind.backwards.inner_api import InnerApi
from plugind.backwards.kinds import KINDS, Kind, target_of
from plugind.backwards.permission import Permission, Permissions
from plugind.backwards.storage import PluginStorage
from plugind.runtime.backwards import (
    STREAM,
    STRUCT,
    BackwardsCall,
    BackwardsOutcome,
    BackwardsReply,
    Caller,
    Outcome,
)

log = logging.getLogger(__name__)

# What Postgres raises while it is away (the storage and the permissions live there).
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class Relay:
    """A :class:`plugind.runtime.backwards.BackwardsRelay`; see the module docstring."""

    def __init__(
        self,
        *,
        permissions: Permissions,
        storage: PluginStorage,
        inner_api: InnerApi | None,
        storage_max_size: int,
    ) -> None:
        self.permissions = permissions
        self.storage = storage
        self.inner_api = inner_api
        self.storage_max_size = storage_max_size

    async def __call__(
        self, caller: Caller, call: BackwardsCall, reply: BackwardsReply
    ) -> BackwardsOutcome:
        started = time.monotonic()
        target = target_of(call.kind, call.request)

        def outcome(result: Outcome, error: str | None = None) -> BackwardsOutcome:
            duration = round((time.monotonic() - started) * 1000, 3)
            return BackwardsOutcome(call.kind, target, result, duration, error)

        async def refuse(result: Outcome, message: str) -> BackwardsOutcome:
            await reply.fail(message)
            return outcome(result, message)

        kind = KINDS.get(call.kind)
        if kind is None:
            return await refuse("denied", f"unsupported invoke type: {call.kind}")
        if caller.access == "model":
            return await refuse("denied", f"you can not invoke dify from {caller.access}")
        try:
            permission = await self.permissions.of(caller.identifier)
        except _DB_ERRORS as exc:
            return await refuse("error", f"cannot read the plugin's permissions: {exc!r}")
        denial = permission.denial(kind)
        if denial is not None:
            return await refuse("denied", denial)
        try:
            if kind.path is None:
                await self._storage(caller, call.request, permission, reply)
            else:
                await self._dify(caller, kind, call.request, reply)
        except BackwardsError as exc:
            return await refuse("error", str(exc))
        except _DB_ERRORS as exc:
            return await refuse("error", f"plugin storage is unavailable: {exc!r}")
        return outcome("ok")

    async def _dify(
        self, caller: Caller, kind: Kind, request: dict[str, Any], reply: BackwardsReply
    ) -> None:
        inner = self.inner_api
        assert kind.path is not None
        if inner is None:
            raise BackwardsError(
                f"plugind cannot relay {kind.name} calls to Dify: DIFY_INNER_API_URL is not set"
            )
        body = {
            **request,
            "tenant_id": caller.tenant_id,
            "user_id": caller.user_id,
            "type": kind.name,
        }
        message = STREAM if kind.streamed else STRUCT

        async def forward(data: Any) -> None:
            if kind.name == "fetch_app" and isinstance(data, dict) and "data" in data:
                data = data["data"]  # dify-api wraps the app's info once more
            await reply.respond(data, message=message)

        try:
            await inner.exchange(kind.path, body, forward)
        except BackwardsError as exc:
            raise BackwardsError(f"invoke {kind.name} failed: {exc}") from None

    async def _storage(
        self,
        caller: Caller,
        request: dict[str, Any],
        permission: Permission,
        reply: BackwardsReply,
    ) -> None:
        tenant, plugin, key = caller.tenant_id, caller.plugin_id, request.get("key")
        opt = request.get("opt")
        if not isinstance(key, str):
            raise StorageError("the storage key must be a non-empty string")
        if opt == "set":
            value = request.get("value")
            if not isinstance(value, str):
                raise StorageError("a storage set needs a hex-encoded `value`")
            try:
                data = binascii.unhexlify(value)
            except (binascii.Error, ValueError) as exc:
                raise StorageError(f"decode data failed: {exc}") from None
            quota = min(permission.storage_size, self.storage_max_size)
            await self.storage.set(tenant, plugin, key, data, quota)
            await reply.respond({"data": "ok"})
        elif opt == "get":
            found = await self.storage.get(tenant, plugin, key)
            await reply.respond({"data": binascii.hexlify(found).decode()})
        elif opt == "del":
            deleted = await self.storage.delete(tenant, plugin, key)
            await reply.respond({"data": "ok", "deleted_num": deleted})
        elif opt == "exist":
            exists = await self.storage.exists(tenant, plugin, key)
            await reply.respond({"data": exists, "exist_num": int(exists)})
        else:
            raise StorageError(f"unknown storage operation {opt!r}: use set, get, del or exist")
