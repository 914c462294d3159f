"""What a consumer hands a handler: one command entry as it was delivered.

A module of its own because both the consumer loop and the reclaimer make deliveries, and the
consumer imports the reclaimer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Delivery:
    """One command entry as a consumer received it.

    ``deliveries`` is how often Redis has handed the entry out, this time included: the
    dead-letter decision needs it.
    """

    stream: str
    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1
