"""The one exception type that crosses layers.

Every failure a producer can see is an ``error`` object in an event: a stable snake_case ``code``
and a human sentence. Raising :class:`PlugindError` with that code anywhere below a handler is
how a failure reaches the event unchanged, so the code is chosen where the failure is understood.
"""

from __future__ import annotations

from typing import Any

from plugind.messages import ErrorInfo


class PlugindError(Exception):
    """A failure with a stable ``code`` that ends up in a terminal event's ``error``."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        error_type: str | None = None,
        args: Any = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error_type = error_type
        self.error_args = args

    def info(self) -> ErrorInfo:
        return ErrorInfo(
            code=self.code, message=self.message, error_type=self.error_type, args=self.error_args
        )

    def __repr__(self) -> str:
        return f"PlugindError({self.code!r}, {self.message!r})"
