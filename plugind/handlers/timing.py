"""Durations as events carry them."""

from __future__ import annotations

import time


def ms_since(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.monotonic()`` reading), to the microsecond."""
    return round((time.monotonic() - started) * 1000, 3)
