"""Answering one backwards invocation of a session: the lines written back to the plugin.

:func:`serve_call` runs in a task of its own for each ``invoke`` the session reads (see
:meth:`plugind.runtime.process.PluginProcess.invoke`), hands the call to the session's
:data:`~plugind.runtime.backwards.Backwards` and makes sure the plugin gets its ``end``: a
malformed call, a missing relay and a relay that raises are each answered with an ``error``,
and so is a call still running when its session ends (it is cancelled).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio

from plugind.errors import PlugindError
from plugind.runtime import protocol
from plugind.runtime.backwards import STRUCT, Backwards, parse_call
from plugind.runtime.protocol import PluginRequest

log = logging.getLogger(__name__)

Write = Callable[[bytes], Awaitable[None]]
REPLY_WRITE_S: Final = 10.0  # how long one answer may wait for the plugin's stdin


class SessionReply:
    """The answers to one call (a :class:`~plugind.runtime.backwards.BackwardsReply`).

    Each line is written shielded from cancellation (with a cap): a line cut in half would
    corrupt the next one, and cost the whole process. After an ``error`` or the ``end``
    nothing more is written.
    """

    __slots__ = ("_ended", "_failed", "_request", "_rid", "_session_id", "_write")

    def __init__(self, write: Write, session_id: str, request: PluginRequest, rid: str) -> None:
        self._write = write
        self._session_id = session_id
        self._request = request
        self._rid = rid
        self._failed = False
        self._ended = False

    async def respond(self, data: Any, *, message: str = STRUCT) -> None:
        if not (self._failed or self._ended):
            await self._send("response", message, data)

    async def fail(self, message: str) -> None:
        if not (self._failed or self._ended):
            self._failed = True
            await self._send("error", message, None)

    async def end(self) -> None:
        if not self._ended:
            self._ended = True
            await self._send("end", "", None)

    async def _send(self, event: str, message: str, data: Any) -> None:
        line = protocol.encode_backwards(
            self._session_id,
            self._rid,
            event,
            message=message,
            data=data,
            request=self._request,
        )
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(REPLY_WRITE_S):
                await self._write(line)
        except PlugindError:
            pass  # the process is gone: its sessions fail through the reader, not from here


async def serve_call(
    write: Write,
    identifier: str,
    session_id: str,
    request: PluginRequest,
    data: Any,
    backwards: Backwards | None,
) -> None:
    """Answer the ``invoke`` carrying ``data``, ending it whatever happens. Never raises."""
    call = parse_call(data)
    if isinstance(call, str):
        log.warning("Plugin %s sent a malformed invoke: %s", identifier, call)
        rid = data.get("backwards_request_id") if isinstance(data, dict) else None
        if isinstance(rid, str) and rid:
            reply = SessionReply(write, session_id, request, rid)
            await reply.fail(f"plugind cannot serve this call: {call}")
            await reply.end()
        return
    reply = SessionReply(write, session_id, request, call.backwards_request_id)
    try:
        if backwards is None:
            await reply.fail(f"plugind cannot relay backwards invocations ({call.kind}) from here")
        else:
            await backwards(call, reply)
    except anyio.get_cancelled_exc_class():
        # The session ended (timed out, failed) with the call in flight: tell the plugin, so
        # its session's code stops waiting now rather than after the SDK's 250 s.
        await reply.fail(f"the {call.kind} call was abandoned: its session ended")
        await reply.end()
        raise
    except PlugindError as exc:
        await reply.fail(exc.message)
    except Exception as exc:
        log.exception("Serving %s's %s call failed", identifier, call.kind)
        await reply.fail(f"plugind failed to serve the {call.kind} call: {exc!r}")
    await reply.end()
