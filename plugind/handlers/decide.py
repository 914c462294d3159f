"""What a command and its outcome come to: events, registry changes and log lines.

The handlers do the I/O (Redis, Postgres, plugin processes, the clock) and hand what happened
to these functions, which decide which event ends the request and with which fields, what the
installed-plugin registry becomes, which version may be stopped, and what the operator reads in
the log. Nothing here awaits or touches the outside world, so every field of every event can be
pinned by a fast unit test (``tests/test_handlers_*.py``) and a change to the wire format shows
up there first. Event ids and timestamps come from the :class:`EventFactory` passed in, which
tests build with fixed ones.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import orjson

from plugind.bus.codec import CMD_FIELD, preview, text
from plugind.bus.delivery import Delivery
from plugind.bus.emit import RegistryChange
from plugind.errors import PlugindError, TimedOut
from plugind.messages import (
    AnyCommand,
    BackwardsInvoked,
    CommandDeadLettered,
    CommandRejected,
    ErrorInfo,
    Event,
    EventFactory,
    InstallCommand,
    Installed,
    InstallFailed,
    InstallProgress,
    InstallStarted,
    TaskCommand,
    TaskFailed,
    TaskResult,
    TaskStarted,
    TaskSucceeded,
    TaskTimedOut,
    UninstallCommand,
    Uninstalled,
    decode_command,
)
from plugind.package.difypkg import PluginPackage
from plugind.runtime.backwards import BackwardsOutcome, Caller
from plugind.runtime.protocol import PluginRequest

E = TypeVar("E", bound=Event)

_CMD = CMD_FIELD.encode()
_REQUEST_ID = re.compile(rb'"request_id"\s*:\s*"([^"\\]{1,128})"')
_TENANT_ID = re.compile(rb'"tenant_id"\s*:\s*"([^"\\]{1,128})"')

# --------------------------------------------------------------------------------------------
# what a decision is made of


@dataclass(frozen=True, slots=True)
class LogLine:
    """One log record, kept as format and arguments so the logger formats it only if enabled."""

    level: int
    message: str
    args: tuple[Any, ...] = ()

    def render(self) -> str:
        return self.message % self.args if self.args else self.message


@dataclass(frozen=True, slots=True)
class Terminal(Generic[E]):
    """The end of a request: its terminal event and what goes with committing it.

    ``registry`` changes in the same atomic step as the event; ``retire`` is a plugin version
    this request stopped needing, to be stopped once committed if no tenant uses it any more.
    ``logs`` are written once the event is committed, or, with ``always_log``, also when a
    duplicate had already ended the request (failures are worth seeing on every node that met
    them).
    """

    event: E
    logs: tuple[LogLine, ...]
    registry: RegistryChange | None = None
    retire: str | None = None
    always_log: bool = False


# --------------------------------------------------------------------------------------------
# dispatch: from an entry to a command, or to the reason it cannot be one


@dataclass(frozen=True, slots=True)
class Refusal:
    """An entry that is not a usable command, with the ids it may still be filed under."""

    error: ErrorInfo
    request_id: str = ""
    tenant_id: str = "default"


def max_command_bytes(max_package_size: int) -> int:
    """The largest ``cmd`` accepted: an inline package (base64: 4/3 of it) and its envelope."""
    return max_package_size * 4 // 3 + 64 * 1024


def read_command(fields: dict[bytes, bytes], max_bytes: int) -> AnyCommand | Refusal:
    """Decode an entry's ``cmd``; a bad entry becomes a :class:`Refusal` naming what is wrong."""
    raw = fields.get(_CMD)
    if raw is None:
        names = ", ".join(sorted(text(k) for k in fields)) or "none"
        return Refusal(
            ErrorInfo("malformed_command", f"entry has no `cmd` field (fields: {names})")
        )
    if len(raw) > max_bytes:
        rid, tenant = best_effort_ids(raw[:4096])
        return Refusal(
            ErrorInfo(
                "payload_too_large",
                f"command is {len(raw)} bytes, over the {max_bytes}-byte limit",
            ),
            rid,
            tenant,
        )
    try:
        return decode_command(raw)
    except msgspec.DecodeError as exc:
        rid, tenant = best_effort_ids(raw)
        return Refusal(ErrorInfo("malformed_command", str(exc)), rid, tenant)


def best_effort_ids(raw: bytes) -> tuple[str, str]:
    """``(request_id, tenant_id)`` of a command that failed to decode, where they are usable.

    So that a producer waiting on its request id still sees the rejection.
    """
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


def rejected(
    events: EventFactory,
    delivery: Delivery,
    error: ErrorInfo,
    *,
    request_id: str = "",
    tenant_id: str = "default",
) -> Terminal[CommandRejected]:
    """``command.rejected``: the command cannot be carried out as sent."""
    event = events(
        CommandRejected,
        request_id=request_id,
        tenant_id=tenant_id,
        stream=delivery.stream,
        entry_id=delivery.entry_id,
        error=error,
        raw=preview(delivery.fields),
    )
    line = LogLine(
        logging.WARNING,
        "Command rejected: %s %s, request_id=%s, code=%s, error=%s",
        (delivery.stream, delivery.entry_id, request_id or "-", error.code, error.message),
    )
    return Terminal(event, (line,), always_log=True)


def dead_lettered(events: EventFactory, delivery: Delivery) -> Terminal[CommandDeadLettered]:
    """``command.dead_lettered``: the entry was delivered too often without finishing."""
    rid, tenant = best_effort_ids(delivery.fields.get(_CMD, b""))
    error = ErrorInfo(
        "max_deliveries_exceeded",
        f"delivered {delivery.deliveries} times without finishing; moved to dead letters",
    )
    event = events(
        CommandDeadLettered,
        request_id=rid,
        tenant_id=tenant,
        stream=delivery.stream,
        entry_id=delivery.entry_id,
        deliveries=delivery.deliveries,
        error=error,
    )
    line = LogLine(
        logging.ERROR,
        "Command dead-lettered: %s %s, request_id=%s, deliveries=%d",
        (delivery.stream, delivery.entry_id, rid or "-", delivery.deliveries),
    )
    return Terminal(event, (line,), always_log=True)


# --------------------------------------------------------------------------------------------
# install


def install_started(events: EventFactory, cmd: InstallCommand) -> InstallStarted:
    return events(
        InstallStarted,
        request_id=cmd.request_id,
        tenant_id=cmd.tenant_id,
        source=cmd.package.describe(),
    )


def install_progress(
    events: EventFactory, cmd: InstallCommand, step: str, message: str
) -> InstallProgress:
    return events(
        InstallProgress,
        request_id=cmd.request_id,
        tenant_id=cmd.tenant_id,
        step=step,
        message=message,
    )


def expected_identifier_error(cmd: InstallCommand, package: PluginPackage) -> PlugindError | None:
    """The producer pinned an identifier and the package is another one."""
    if cmd.expected_identifier is None or cmd.expected_identifier == package.identifier:
        return None
    return PlugindError(
        "checksum_mismatch",
        f"package is {package.identifier}, expected {cmd.expected_identifier}",
    )


def installed(
    events: EventFactory,
    cmd: InstallCommand,
    package: PluginPackage,
    *,
    previous: str | None,
    duration_ms: float,
) -> Terminal[Installed]:
    """``plugin.installed``; ``previous`` is the identifier the tenant had installed, if any.

    Installing another version is an upgrade: the old one is named in ``upgraded_from`` and
    retired. Installing the same version again is not an upgrade.
    """
    tenant = cmd.tenant_id
    upgraded_from = previous if previous and previous != package.identifier else None
    event = events(
        Installed,
        request_id=cmd.request_id,
        tenant_id=tenant,
        plugin_id=package.plugin_id,
        identifier=package.identifier,
        version=package.version,
        checksum=package.checksum,
        manifest=package.summary(),
        upgraded_from=upgraded_from,
        duration_ms=duration_ms,
    )
    line = LogLine(
        logging.INFO,
        "Plugin installed: %s, tenant=%s, request_id=%s, duration=%.1fs%s",
        (
            package.identifier,
            tenant,
            cmd.request_id,
            duration_ms / 1000,
            f", upgraded_from={upgraded_from}" if upgraded_from else "",
        ),
    )
    return Terminal(
        event,
        (line,),
        registry=RegistryChange("set", tenant, package.plugin_id, package.identifier),
        retire=upgraded_from,
    )


def install_failed(
    events: EventFactory,
    cmd: InstallCommand,
    failure: PlugindError | TimeoutError,
    *,
    plugin_id: str | None,
    install_timeout: float,
    duration_ms: float,
) -> Terminal[InstallFailed]:
    """``plugin.install_failed``; ``plugin_id`` is known once the package has been read.

    A ``TimeoutError`` is the install's own deadline (``PLUGIN_INSTALL_TIMEOUT``) running out.
    """
    error = (
        failure
        if isinstance(failure, PlugindError)
        else TimedOut(f"install did not finish within {install_timeout:g}s")
    )
    event = events(
        InstallFailed,
        request_id=cmd.request_id,
        tenant_id=cmd.tenant_id,
        plugin_id=plugin_id,
        error=error.info(),
        duration_ms=duration_ms,
    )
    line = LogLine(
        logging.WARNING,
        "Plugin install failed: %s, request_id=%s, code=%s, error=%s",
        (plugin_id or cmd.package.describe(), cmd.request_id, error.code, error.message),
    )
    return Terminal(event, (line,), always_log=True)


# --------------------------------------------------------------------------------------------
# uninstall


def uninstall(
    events: EventFactory,
    cmd: UninstallCommand,
    delivery: Delivery,
    *,
    installed: str | None,
) -> Terminal[Uninstalled] | Terminal[CommandRejected]:
    """``plugin.uninstalled`` of the tenant's version, or ``not_installed`` if it has none.

    There is no ``uninstall_failed`` event type, so a plugin that is not installed is a
    rejected command.
    """
    if installed is None:
        return rejected(
            events,
            delivery,
            ErrorInfo(
                "not_installed",
                f"plugin {cmd.plugin_id} is not installed for tenant {cmd.tenant_id}",
            ),
            request_id=cmd.request_id,
            tenant_id=cmd.tenant_id,
        )
    event = events(
        Uninstalled,
        request_id=cmd.request_id,
        tenant_id=cmd.tenant_id,
        plugin_id=cmd.plugin_id,
        identifier=installed,
    )
    line = LogLine(
        logging.INFO,
        "Plugin uninstalled: %s, tenant=%s, request_id=%s",
        (installed, cmd.tenant_id, cmd.request_id),
    )
    return Terminal(
        event,
        (line,),
        registry=RegistryChange("del", cmd.tenant_id, cmd.plugin_id),
        retire=installed,
    )


# --------------------------------------------------------------------------------------------
# task

TaskEnd = TaskSucceeded | TaskFailed | TaskTimedOut


def task_timeout(cmd: TaskCommand, default: float) -> float:
    """The command's ``timeout_s``, else ``PLUGIN_TASK_TIMEOUT``."""
    return cmd.timeout_s or default


def plugin_request(cmd: TaskCommand) -> PluginRequest:
    """The request line the plugin gets: Dify's fields, passed through unchanged."""
    return PluginRequest(
        access=cmd.access,
        action=cmd.action,
        payload=cmd.payload,
        user_id=cmd.user_id,
        conversation_id=cmd.conversation_id,
        message_id=cmd.message_id,
        app_id=cmd.app_id,
        endpoint_id=cmd.endpoint_id,
        context=cmd.context,
    )


def task_started(
    events: EventFactory,
    cmd: TaskCommand,
    *,
    plugin_id: str,
    identifier: str,
    attempt: int,
) -> TaskStarted:
    return events(
        TaskStarted,
        request_id=cmd.request_id,
        tenant_id=cmd.tenant_id,
        plugin_id=plugin_id,
        identifier=identifier,
        access=cmd.access,
        action=cmd.action,
        attempt=attempt,
    )


def task_ended(
    events: EventFactory,
    cmd: TaskCommand,
    outcome: list[Any] | PlugindError,
    *,
    plugin_id: str,
    timeout_s: float,
    duration_ms: float,
) -> Terminal[TaskEnd]:
    """The terminal event of a task from what the plugin (or the way to it) gave.

    ``outcome`` is the chunks the plugin streamed, or the error that ended the task: a
    ``timeout`` becomes ``task.timed_out``, any other code (``plugin_error``, ``plugin_crashed``,
    ``result_too_large``, ``not_installed``, ...) ``task.failed``. ``plugin_id`` is the resolved
    ``author/name``, or the command's own reference when resolving it failed.
    """
    rid, tenant = cmd.request_id, cmd.tenant_id
    event: TaskEnd
    lines: list[LogLine] = []
    if not isinstance(outcome, PlugindError):
        status = "success"
        event = events(
            TaskSucceeded,
            request_id=rid,
            tenant_id=tenant,
            plugin_id=plugin_id,
            result=TaskResult(chunks=outcome),
            duration_ms=duration_ms,
        )
    elif outcome.code == "timeout":
        status = "timeout"
        event = events(
            TaskTimedOut,
            request_id=rid,
            tenant_id=tenant,
            plugin_id=plugin_id,
            timeout_s=timeout_s,
            duration_ms=duration_ms,
        )
        lines.append(
            LogLine(
                logging.WARNING,
                "Plugin task timeout: %s, request_id=%s, timeout=%gs",
                (plugin_id, rid, timeout_s),
            )
        )
    else:
        status = "failed"
        error = outcome.info()
        event = events(
            TaskFailed,
            request_id=rid,
            tenant_id=tenant,
            plugin_id=plugin_id,
            error=error,
            duration_ms=duration_ms,
        )
        lines.append(
            LogLine(
                logging.WARNING,
                "Plugin task failed: %s, request_id=%s, code=%s, error=%s",
                (plugin_id, rid, error.code, error.message),
            )
        )
    lines.append(
        LogLine(
            logging.INFO,
            "Plugin task executed: %s, request_id=%s, duration=%.3fs, status=%s",
            (plugin_id, rid, duration_ms / 1000, status),
        )
    )
    return Terminal(event, tuple(lines))


def caller(cmd: TaskCommand, *, plugin_id: str, identifier: str) -> Caller:
    """The task as the plugin's calls back into Dify see it: on whose behalf, from where."""
    return Caller(
        request_id=cmd.request_id,
        tenant_id=cmd.tenant_id,
        user_id=cmd.user_id,
        plugin_id=plugin_id,
        identifier=identifier,
        access=cmd.access,
        action=cmd.action,
    )


MAX_BACKWARDS_ERROR = 500  # characters of a failed call's error kept in its event


def backwards_invoked(
    events: EventFactory, cmd: TaskCommand, outcome: BackwardsOutcome, *, plugin_id: str
) -> tuple[BackwardsInvoked, LogLine]:
    """``task.backwards_invoked`` for one call of the plugin, and its log line.

    Calls that went well are logged at DEBUG (an agent makes many); refusals and failures at
    WARNING, with the reason.
    """
    event = events(
        BackwardsInvoked,
        request_id=cmd.request_id,
        tenant_id=cmd.tenant_id,
        plugin_id=plugin_id,
        kind=outcome.kind,
        target=outcome.target,
        outcome=outcome.outcome,
        duration_ms=outcome.duration_ms,
        error=outcome.error[:MAX_BACKWARDS_ERROR] if outcome.error else None,
    )
    level = logging.DEBUG if outcome.outcome == "ok" else logging.WARNING
    line = LogLine(
        level,
        "Plugin backwards call: %s %s %s, request_id=%s, outcome=%s, duration=%.1fms%s",
        (
            plugin_id,
            outcome.kind,
            outcome.target or "-",
            cmd.request_id,
            outcome.outcome,
            outcome.duration_ms,
            f", error={outcome.error}" if outcome.error else "",
        ),
    )
    return event, line
