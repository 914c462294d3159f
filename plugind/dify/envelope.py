"""The envelope Dify's API server expects from its plugin daemon on every ``/plugin/…`` route.

Every answer on a ``/plugin/{tenant}/…`` route is ``{"code", "message", "data"}``:

- success: ``code 0``, ``message "success"``, ``data`` not null;
- a business error: still HTTP 200, ``code`` -400/-404/-500…, ``data`` null, and ``message`` the
  JSON *string* of ``{"error_type", "message", "args"}``; dify-api maps ``error_type`` onto its
  own exception classes (``api/core/plugin/impl/base.py``).

Streams (every ``dispatch`` route) carry one envelope per frame, each framed exactly as
``data: <envelope JSON>\\n\\n``: dify-api parses every non-blank line as JSON after stripping
``data:``, so nothing else may be written.

A plugin-raised error is nested once more: the frame's ``message`` is the envelope error of type
``PluginInvokeError`` whose own ``message`` is the JSON string of what the plugin sent
(``{"message", "error_type", "args"}``), so dify-api can raise the plugin's own error type.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from starlette.responses import Response

# --- the error types dify-api knows (api/core/plugin/impl/exc.py and base.py) ------------------

PLUGIN_DAEMON_INNER_ERROR: Final = "PluginDaemonInnerError"
PLUGIN_INVOKE_ERROR: Final = "PluginInvokeError"
PLUGIN_DAEMON_INTERNAL_SERVER_ERROR: Final = "PluginDaemonInternalServerError"
PLUGIN_DAEMON_BAD_REQUEST_ERROR: Final = "PluginDaemonBadRequestError"
PLUGIN_DAEMON_NOT_FOUND_ERROR: Final = "PluginDaemonNotFoundError"
PLUGIN_UNIQUE_IDENTIFIER_ERROR: Final = "PluginUniqueIdentifierError"
PLUGIN_NOT_FOUND_ERROR: Final = "PluginNotFoundError"
PLUGIN_DAEMON_UNAUTHORIZED_ERROR: Final = "PluginDaemonUnauthorizedError"
PLUGIN_PERMISSION_DENIED_ERROR: Final = "PluginPermissionDeniedError"

ERROR_TYPES: Final = frozenset(
    {
        PLUGIN_DAEMON_INNER_ERROR,
        PLUGIN_INVOKE_ERROR,
        PLUGIN_DAEMON_INTERNAL_SERVER_ERROR,
        PLUGIN_DAEMON_BAD_REQUEST_ERROR,
        PLUGIN_DAEMON_NOT_FOUND_ERROR,
        PLUGIN_UNIQUE_IDENTIFIER_ERROR,
        PLUGIN_NOT_FOUND_ERROR,
        PLUGIN_DAEMON_UNAUTHORIZED_ERROR,
        PLUGIN_PERMISSION_DENIED_ERROR,
    }
)

# Upstream's business codes.
CODE_BAD_REQUEST: Final = -400
CODE_NOT_FOUND: Final = -404
CODE_INTERNAL: Final = -500

# The envelope code each error type is sent with when the caller does not choose one.
_DEFAULT_CODE: Final[dict[str, int]] = {
    PLUGIN_DAEMON_BAD_REQUEST_ERROR: CODE_BAD_REQUEST,
    PLUGIN_UNIQUE_IDENTIFIER_ERROR: CODE_BAD_REQUEST,
    PLUGIN_DAEMON_NOT_FOUND_ERROR: CODE_NOT_FOUND,
    PLUGIN_NOT_FOUND_ERROR: CODE_NOT_FOUND,
    PLUGIN_DAEMON_UNAUTHORIZED_ERROR: -401,
    PLUGIN_PERMISSION_DENIED_ERROR: -403,
}

SUCCESS: Final = "success"
SSE_MEDIA_TYPE: Final = "text/event-stream"


class DifyError(Exception):
    """A business error for a Dify route: becomes an HTTP 200 envelope (or one stream frame)."""

    def __init__(
        self, error_type: str, message: str, *, args: Any = None, code: int | None = None
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.error_args = args
        self.code = code if code is not None else _DEFAULT_CODE.get(error_type, CODE_INTERNAL)

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.error_type, self.message, args=self.error_args, code=self.code)

    def __repr__(self) -> str:
        return f"DifyError({self.error_type!r}, {self.message!r}, code={self.code})"


def bad_request(message: str, args: Any = None) -> DifyError:
    return DifyError(PLUGIN_DAEMON_BAD_REQUEST_ERROR, message, args=args)


def not_found(message: str, args: Any = None) -> DifyError:
    return DifyError(PLUGIN_DAEMON_NOT_FOUND_ERROR, message, args=args)


def plugin_not_found(message: str, args: Any = None) -> DifyError:
    return DifyError(PLUGIN_NOT_FOUND_ERROR, message, args=args)


def internal_error(message: str, args: Any = None) -> DifyError:
    return DifyError(PLUGIN_DAEMON_INTERNAL_SERVER_ERROR, message, args=args)


def timeout_error() -> DifyError:
    """What upstream sends when a plugin outlives ``PLUGIN_MAX_EXECUTION_TIMEOUT``."""
    return DifyError(PLUGIN_DAEMON_INTERNAL_SERVER_ERROR, "killed by timeout")


def invoke_error(plugin_error_type: str | None, message: str, args: Any = None) -> DifyError:
    """A plugin-raised error: ``PluginInvokeError`` wrapping what the plugin sent.

    dify-api parses the inner message as JSON and raises by its ``error_type`` (e.g.
    ``CredentialsValidateFailedError``, ``InvokeRateLimitError``, ``ZeroDivisionError``).
    """
    inner = orjson.dumps(
        {"message": message, "error_type": plugin_error_type or "PluginInvokeError", "args": args}
    ).decode()
    return DifyError(PLUGIN_INVOKE_ERROR, inner, code=CODE_INTERNAL)


# --- envelopes ---------------------------------------------------------------------------------


def success_envelope(data: Any) -> dict[str, Any]:
    return {"code": 0, "message": SUCCESS, "data": data}


def error_envelope(
    error_type: str, message: str, *, args: Any = None, code: int | None = None
) -> dict[str, Any]:
    text = orjson.dumps({"error_type": error_type, "message": message, "args": args}).decode()
    return {
        "code": code if code is not None else _DEFAULT_CODE.get(error_type, CODE_INTERNAL),
        "message": text,
        "data": None,
    }


def _dumps(body: Any) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def ok(data: Any) -> Response:
    """HTTP 200 success envelope. ``data`` must not be None (dify-api refuses that)."""
    if data is None:
        raise ValueError("a Dify success envelope must carry data (use True, [] or {})")
    return Response(_dumps(success_envelope(data)), media_type="application/json")


def error(err: DifyError) -> Response:
    """HTTP 200 business error envelope."""
    return Response(_dumps(err.envelope()), media_type="application/json")


def fail(error_type: str, message: str, *, args: Any = None, code: int | None = None) -> Response:
    return error(DifyError(error_type, message, args=args, code=code))


# --- SSE frames --------------------------------------------------------------------------------


def sse_frame(envelope: dict[str, Any]) -> bytes:
    """One stream frame: ``data: <envelope JSON>\\n\\n`` and nothing else."""
    return b"data: " + _dumps(envelope) + b"\n\n"


def sse_chunk(chunk: Any) -> bytes:
    return sse_frame(success_envelope(chunk))


def sse_raw_chunk(chunk_json: bytes) -> bytes:
    """A success frame around a chunk that is already JSON (what the out stream holds), without
    decoding and re-encoding it."""
    return b'data: {"code":0,"message":"success","data":' + chunk_json + b"}\n\n"


def sse_error(err: DifyError) -> bytes:
    """An error frame. Always ``code -500``: dify-api's stream reader maps ``error_type`` onto
    its exceptions only for -500 and turns any other code into a bare ``ValueError``."""
    return sse_frame(
        error_envelope(err.error_type, err.message, args=err.error_args, code=CODE_INTERNAL)
    )
