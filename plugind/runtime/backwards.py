"""A plugin calling back into Dify in the middle of a session, as the runtime sees it.

The SDK sends ``{"event": "session", "data": {"type": "invoke", "data": {"type": <kind>,
"backwards_request_id": ..., "request": {...}}}}`` and then waits (up to 250 s) for
``backwards_response`` lines carrying that id: any number of ``response``, or one ``error``,
then one ``end``. The runtime only parses the call and writes those lines; what a call may do
and where it goes (the permission check, Dify's inner API, plugin storage) is decided by a
:class:`BackwardsRelay` the daemon injects (``plugind.backwards``), so this package needs no
HTTP client, no database and no knowledge of Dify.

Whatever the relay does, the session gets its ``end``: a relay that raises is answered with an
``error`` for it, so a plugin never waits out its own timeout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

Outcome = Literal["ok", "error", "denied"]
STREAM: Final = "stream"  # a reply that is one of many (an LLM chunk)
STRUCT: Final = "struct"  # a reply that is the whole answer


@dataclass(frozen=True, slots=True)
class BackwardsCall:
    """One ``invoke`` of a plugin: the kind of call (``llm``, ``tool``, ``storage``...) and
    its request, as the SDK sent them."""

    kind: str
    backwards_request_id: str
    request: dict[str, Any]


def parse_call(data: Any) -> BackwardsCall | str:
    """The call in an ``invoke`` message, or why it is not one."""
    if not isinstance(data, dict):
        return "the invoke message is not an object"
    kind, rid, request = data.get("type"), data.get("backwards_request_id"), data.get("request")
    if not isinstance(rid, str) or not rid:
        return "the invoke message has no backwards_request_id"
    if not isinstance(kind, str) or not kind:
        return "the invoke message has no type"
    if not isinstance(request, dict):
        return f"the {kind} invoke message has no request object"
    return BackwardsCall(kind, rid, request)


class BackwardsReply(Protocol):
    """The answers to one call, written to the plugin as they are given."""

    async def respond(self, data: Any, *, message: str = STRUCT) -> None:
        """One ``response`` (``message`` is ``stream`` for a part, ``struct`` for a whole)."""

    async def fail(self, message: str) -> None:
        """The ``error``: the plugin's call raises an exception with ``message``."""

    async def end(self) -> None:
        """The ``end``: the plugin stops waiting. Written once; the runtime writes it anyway
        when the relay returns, so a relay calls it only to end the call sooner."""


@dataclass(frozen=True, slots=True)
class Caller:
    """The task on whose behalf a plugin calls back: who pays, whose data, which plugin."""

    request_id: str
    tenant_id: str
    user_id: str
    plugin_id: str  # author/name
    identifier: str  # author/name:version@checksum
    access: str  # what the task asked of the plugin (a ``model`` plugin may not call back)
    action: str


@dataclass(frozen=True, slots=True)
class BackwardsOutcome:
    """What one call came to, for the audit event: never the call's contents."""

    kind: str
    target: str  # provider/model, tool, app id, storage operation... ("" when unknown)
    outcome: Outcome
    duration_ms: float
    error: str | None = None


class BackwardsRelay(Protocol):
    """Serves plugins' calls back into Dify (``plugind.backwards.Relay`` in the daemon)."""

    async def __call__(
        self, caller: Caller, call: BackwardsCall, reply: BackwardsReply
    ) -> BackwardsOutcome:
        """Answer ``call`` through ``reply`` (its ``end`` is written afterwards if need be)."""
        ...


Backwards = Callable[[BackwardsCall, BackwardsReply], Awaitable[None]]
"""What a session does with each call of its plugin: a relay bound to the session's task."""
