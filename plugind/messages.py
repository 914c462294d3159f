"""Schemas of every command and event: the single source of truth for the wire format.

Commands arrive as the JSON in a stream entry's ``cmd`` field and events leave as the JSON in an
entry's ``event`` field (docs/architecture.md). Both are tagged unions on ``type``, so one decode
both validates and dispatches, and a decode error names the bad field (``Object missing required
field `plugin_id` - at `$```). Unknown fields are ignored so producers may send more than we read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final, TypeVar

import msgspec
from msgspec import Meta, Struct

RequestId = Annotated[str, Meta(min_length=1, max_length=128)]
TenantId = Annotated[str, Meta(min_length=1, max_length=128)]
PluginRef = Annotated[str, Meta(min_length=3, max_length=512)]

# --------------------------------------------------------------------------------------------
# commands


class PackageRef(Struct, forbid_unknown_fields=False, omit_defaults=True):
    """Where an install's package comes from: exactly one of the three fields."""

    path: str | None = None
    base64: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("path", "base64", "sha256") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "package must have exactly one of `path`, `base64`, `sha256`"
                + (f" (got {', '.join(given)})" if given else "")
            )

    def describe(self) -> str:
        """A short label of the source, for the ``source`` of ``plugin.install_started``."""
        if self.path is not None:
            return f"path:{self.path}"
        if self.sha256 is not None:
            return f"sha256:{self.sha256}"
        return f"base64:{len(self.base64 or '')} chars"


class Command(Struct, tag_field="type", kw_only=True):
    request_id: RequestId
    tenant_id: TenantId = "default"


class InstallCommand(Command, tag="install", kw_only=True):
    package: PackageRef
    expected_identifier: str | None = None


class UninstallCommand(Command, tag="uninstall", kw_only=True):
    plugin_id: PluginRef


class TaskCommand(Command, tag="task", kw_only=True):
    plugin_id: PluginRef
    access: Annotated[str, Meta(min_length=1)]
    action: Annotated[str, Meta(min_length=1)]
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    user_id: str = ""
    timeout_s: Annotated[float, Meta(gt=0, le=86_400)] | None = None
    conversation_id: str | None = None
    message_id: str | None = None
    app_id: str | None = None
    endpoint_id: str | None = None
    context: dict[str, Any] | None = None
    stream: bool = False


AnyCommand = InstallCommand | UninstallCommand | TaskCommand

# --------------------------------------------------------------------------------------------
# events


class ErrorInfo(Struct, omit_defaults=True):
    code: str
    message: str
    error_type: str | None = None
    args: Any = None


class ManifestSummary(Struct):
    label: Any = None
    description: Any = None
    author: str = ""
    runner: dict[str, Any] = msgspec.field(default_factory=dict)
    tools: list[str] = msgspec.field(default_factory=list)


class TaskResult(Struct):
    chunks: list[Any]


class Event(Struct, tag_field="type", kw_only=True):
    v: int = 1
    event_id: str
    request_id: str
    tenant_id: str
    at: str
    node: str


class InstallStarted(Event, tag="plugin.install_started", kw_only=True):
    source: str


class InstallProgress(Event, tag="plugin.install_progress", kw_only=True):
    step: str
    message: str


class Installed(Event, tag="plugin.installed", kw_only=True):
    plugin_id: str
    identifier: str
    version: str
    checksum: str
    manifest: ManifestSummary
    upgraded_from: str | None = None
    duration_ms: float


class InstallFailed(Event, tag="plugin.install_failed", kw_only=True):
    plugin_id: str | None = None
    error: ErrorInfo
    duration_ms: float


class Uninstalled(Event, tag="plugin.uninstalled", kw_only=True):
    plugin_id: str
    identifier: str


class TaskStarted(Event, tag="task.started", kw_only=True):
    plugin_id: str
    identifier: str
    access: str
    action: str
    attempt: int


class TaskSucceeded(Event, tag="task.succeeded", kw_only=True):
    plugin_id: str
    result: TaskResult
    duration_ms: float


class TaskFailed(Event, tag="task.failed", kw_only=True):
    plugin_id: str
    error: ErrorInfo
    duration_ms: float


class TaskTimedOut(Event, tag="task.timed_out", kw_only=True):
    plugin_id: str
    timeout_s: float
    duration_ms: float


class BackwardsInvoked(Event, tag="task.backwards_invoked", kw_only=True):
    """A plugin called back into Dify (or its storage) during a task: what, never contents.

    ``outcome`` is ``ok``, ``error`` (Dify or the storage failed; ``error`` says why) or
    ``denied`` (refused before leaving plugind: the manifest's permissions, a model plugin).
    """

    plugin_id: str
    kind: str
    target: str
    outcome: str
    duration_ms: float
    error: str | None = None


class EndpointEvent(Event, kw_only=True):
    """A tenant's endpoint (a plugin's HTTP hook at ``/e/{hook_id}``) as it now is.

    ``settings`` hold the endpoint's settings with every secret input masked; the secret
    values themselves (encrypted by Dify) are kept outside the event log.
    """

    plugin_id: str
    endpoint_id: str
    hook_id: str
    name: str
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    user_id: str = ""


class EndpointSetUp(EndpointEvent, tag="endpoint.set_up", kw_only=True):
    pass


class EndpointUpdated(EndpointEvent, tag="endpoint.updated", kw_only=True):
    pass


class EndpointEnabled(EndpointEvent, tag="endpoint.enabled", kw_only=True):
    pass


class EndpointDisabled(EndpointEvent, tag="endpoint.disabled", kw_only=True):
    pass


class EndpointRemoved(EndpointEvent, tag="endpoint.removed", kw_only=True):
    pass


ENDPOINT_EVENTS: Final = (
    EndpointSetUp,
    EndpointUpdated,
    EndpointEnabled,
    EndpointDisabled,
    EndpointRemoved,
)


class CommandRejected(Event, tag="command.rejected", kw_only=True):
    stream: str
    entry_id: str
    error: ErrorInfo
    raw: str


class CommandDeadLettered(Event, tag="command.dead_lettered", kw_only=True):
    stream: str
    entry_id: str
    deliveries: int
    error: ErrorInfo


AnyEvent = (
    InstallStarted
    | InstallProgress
    | Installed
    | InstallFailed
    | Uninstalled
    | TaskStarted
    | TaskSucceeded
    | TaskFailed
    | TaskTimedOut
    | BackwardsInvoked
    | EndpointSetUp
    | EndpointUpdated
    | EndpointEnabled
    | EndpointDisabled
    | EndpointRemoved
    | CommandRejected
    | CommandDeadLettered
)

TERMINAL_EVENT_TYPES: Final = frozenset(
    {
        "plugin.installed",
        "plugin.install_failed",
        "plugin.uninstalled",
        "task.succeeded",
        "task.failed",
        "task.timed_out",
        "command.rejected",
        "command.dead_lettered",
    }
)

# --------------------------------------------------------------------------------------------
# codecs (module-level: building a decoder is costly, using one is cheap)

_command_decoder: Final = msgspec.json.Decoder(AnyCommand)
_event_decoder: Final = msgspec.json.Decoder(AnyEvent)
_encoder: Final = msgspec.json.Encoder()


def decode_command(raw: bytes | str) -> AnyCommand:
    """Decode and validate one command; raises ``msgspec.DecodeError`` (incl. ValidationError)."""
    command: AnyCommand = _command_decoder.decode(raw)
    return command


def decode_event(raw: bytes | str) -> AnyEvent:
    event: AnyEvent = _event_decoder.decode(raw)
    return event


def encode(message: Command | Event | Struct) -> bytes:
    return _encoder.encode(message)


def event_type(event: Event) -> str:
    """The ``type`` tag of an event instance."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def is_terminal(event: Event) -> bool:
    return event_type(event) in TERMINAL_EVENT_TYPES


def now_rfc3339() -> str:
    """UTC now as RFC 3339 with microseconds and a ``Z`` suffix, as every event's ``at``."""
    return datetime.now(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def new_event_id() -> str:
    """A new UUIDv7 (RFC 9562): random, and ordered by time to the millisecond.

    Ids made in the same millisecond share their first 12 hex digits, so ``event_log``'s unique
    index on ``event_id`` grows at its end, as on a serial, instead of everywhere (a random
    UUIDv4 touches a random leaf page of an index that grows with the log). Cheaper to make,
    too: no ``uuid.UUID`` object.
    """
    value = (
        (time.time_ns() // 1_000_000) << 80
        | int.from_bytes(os.urandom(10), "big") & _V7_RANDOM
        | _V7_VERSION_VARIANT
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# after the 48-bit milliseconds: version 7 (4 bits), 12 random bits, variant 0b10, 62 random bits
_V7_VERSION_VARIANT: Final = (0x7 << 76) | (0b10 << 62)
_V7_RANDOM: Final = (0xFFF << 64) | ((1 << 62) - 1)


E = TypeVar("E", bound=Event)


class EventFactory:
    """Stamps the common fields of events emitted by one daemon node.

    ``new_id`` and ``now`` are parameters so that tests of the handlers' decisions can pin an
    event's every field; the daemon keeps the defaults.
    """

    def __init__(
        self,
        node: str,
        *,
        new_id: Callable[[], str] = new_event_id,
        now: Callable[[], str] = now_rfc3339,
    ) -> None:
        self.node = node
        self._new_id = new_id
        self._now = now

    def __call__(self, cls: type[E], *, request_id: str, tenant_id: str, **fields: Any) -> E:
        return cls(
            event_id=self._new_id(),
            request_id=request_id,
            tenant_id=tenant_id,
            at=self._now(),
            node=self.node,
            **fields,
        )
