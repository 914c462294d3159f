"""plugind's exceptions, and the closed set of error codes that reach producers.

Every failure a producer can see is an ``error`` object in an event: a stable snake_case ``code``
and a human sentence. Raising :class:`PlugindError` with that code anywhere below a handler is
how a failure reaches the event unchanged, so the code is chosen where the failure is understood.

The codes are a ``Literal`` type, :data:`ErrorCode`, so mypy rejects a misspelt code at the raise
site and (with ``strict_equality``) a comparison with a code that does not exist. A ``Literal``
rather than a ``StrEnum``: the strings are the wire format, so what a raise site writes is
exactly what the event carries, with no member to convert, and the raise sites stay as they were.
:class:`~plugind.messages.ErrorInfo` keeps ``code: str`` on purpose, so a reader still decodes an
event whose code a newer version added.

A code that callers tell apart has its own subclass, and callers catch the class instead of
comparing strings. The base class accepts only :data:`PlainCode` (the codes without a
subclass), so ``PlugindError("timeout", ...)``, which an ``except TimedOut`` would miss, does not
type-check.

- :class:`TimedOut` (``timeout``): the task handler ends the task with ``task.timed_out``
  instead of ``task.failed``.
- :class:`TooLarge` (``payload_too_large``, ``package_too_large``): 413 at the write gateway.
- :class:`PackageNotFound` (``package_not_found``): 404 at the write gateway.

The other exceptions, and where they live
-----------------------------------------
None of them is a :class:`PlugindError`: none ever becomes an event's ``error``. Each is answered
where it is raised (an exit code, an HTTP status, the caller of ``wait``) and keeps the built-in
base its callers catch it by.

Defined here (they need only the standard library, so importing one never pulls in the module
that raises it, and this module is the one place to look):

- :class:`ConfigError` (a ``ValueError``): a bad setting; raised by ``config``, ``daemon`` and
  ``package.signature`` (key files), printed as one line by the CLI.
- :class:`CliError`: a CLI command failed; carries the exit code. Raised in ``cli/``.
- :class:`WaitTimeout` (a ``TimeoutError``): :meth:`plugind.client.Client.wait` ran out of
  time; ``plugind.client`` re-exports it, since producers use it with the client.
- :class:`BadParameterError` (a ``ValueError``): a read-API query parameter; a 400 there.
- :class:`EmbeddedServerError` (a ``RuntimeError``) and its :class:`DataDirInUseError`: an
  embedded Redis or Postgres could not start or stop; raised in ``embedded/``.

Defined next to their code:

- ``ProjectionConflictError`` (a ``RuntimeError``) in ``plugind/projections/projector.py``: the
  database's event log follows another namespace's events stream. It stays there while that
  module is being split; it can move here afterwards, since it needs nothing from it.

Not exceptions, though named like ones: ``SessionError`` and ``StreamError`` in
``plugind/runtime/protocol.py`` are messages a plugin process sends (it raised; it could not
parse a line). The runtime turns a ``SessionError`` into ``PlugindError("plugin_error")``.
"""

from __future__ import annotations

from typing import Any, Final, Literal, get_args

from plugind.messages import ErrorInfo

ErrorCode = Literal[
    # the codes of docs/architecture.md, "Events"
    "malformed_command",
    "unknown_plugin",
    "not_installed",
    "package_too_large",
    "invalid_package",
    "unsafe_package",
    "checksum_mismatch",
    "signature_invalid",
    "dependency_install_failed",
    "plugin_start_failed",
    "plugin_crashed",
    "plugin_error",
    "timeout",
    "result_too_large",
    # plugind's additions (docs/architecture.md)
    "package_not_found",
    "payload_too_large",
    "max_deliveries_exceeded",
    "database_unavailable",  # an install or upload that needs Postgres during its outage
    # HTTP answers only, never in an event: the write gateway and the read API
    "unauthorized",
    "invalid_parameter",
    "not_found",
    "method_not_allowed",
    "http_error",
    "redis_unavailable",
]
"""Every ``code`` plugind puts on the wire, in events' ``error`` and in HTTP error bodies."""

TooLargeCode = Literal["payload_too_large", "package_too_large"]

PlainCode = Literal[
    "malformed_command",
    "unknown_plugin",
    "not_installed",
    "invalid_package",
    "unsafe_package",
    "checksum_mismatch",
    "signature_invalid",
    "dependency_install_failed",
    "plugin_start_failed",
    "plugin_crashed",
    "plugin_error",
    "result_too_large",
    "max_deliveries_exceeded",
    "database_unavailable",
    "unauthorized",  # create_gateway_app without an API key
]
"""The codes raised as a plain :class:`PlugindError`: those without a subclass of their own."""

ERROR_CODES: Final[tuple[ErrorCode, ...]] = get_args(ErrorCode)


class PlugindError(Exception):
    """A failure with a stable ``code`` that ends up in a terminal event's ``error``."""

    code: ErrorCode

    def __init__(
        self,
        code: PlainCode,
        message: str,
        *,
        error_type: str | None = None,
        args: Any = None,
    ) -> None:
        self._init(code, message, error_type, args)

    def _init(
        self, code: ErrorCode, message: str, error_type: str | None = None, args: Any = None
    ) -> None:
        """Set the fields; subclasses call it with their own code, which ``__init__`` refuses."""
        Exception.__init__(self, message)
        self.code = code
        self.message = message
        self.error_type = error_type
        self.error_args = args

    def info(self) -> ErrorInfo:
        """The ``error`` object of the event this failure ends in: the same code and message."""
        return ErrorInfo(
            code=self.code, message=self.message, error_type=self.error_type, args=self.error_args
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class TimedOut(PlugindError):
    """The work did not finish in its time (a task, an install, a plugin start).

    A task that times out ends with ``task.timed_out``, not ``task.failed``, so the task handler
    catches this class apart from the other failures.
    """

    code: Literal["timeout"]

    def __init__(self, message: str) -> None:
        self._init("timeout", message)


class TooLarge(PlugindError):
    """What the producer sent is over a size limit: a command or body, or a package.

    The write gateway answers it with 413 instead of 400. ``result_too_large`` is not one of
    these: there the plugin, not the producer, went over the limit.
    """

    code: TooLargeCode

    def __init__(self, code: TooLargeCode, message: str) -> None:
        self._init(code, message)


class PackageNotFound(PlugindError):
    """No stored package (or inbox file) has the sha256, identifier or path asked for.

    The write gateway answers it with 404; in an install it is ``plugin.install_failed``.
    """

    code: Literal["package_not_found"]

    def __init__(self, message: str) -> None:
        self._init("package_not_found", message)


# ------------------------------------------------------------------------------------------------
# not PlugindErrors: see the module docstring


class ConfigError(ValueError):
    """A setting is missing or has a bad value; the message names the variable."""


class CliError(Exception):
    """The operation failed; the message goes to stderr and the exit code is ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class WaitTimeout(TimeoutError):
    """The request had not ended when the wait ran out; it may still end later."""


class BadParameterError(ValueError):
    """A query parameter has a value the endpoint cannot use; becomes a 400."""


class EmbeddedServerError(RuntimeError):
    """An embedded server could not start or stop; the message says why and where its log is."""


class DataDirInUseError(EmbeddedServerError):
    """Another live process already runs a server on this data dir."""
