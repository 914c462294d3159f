"""Type aliases for the asyncpg objects the projection code accepts.

A pool's ``acquire()`` yields a proxy, not a ``Connection``; both run queries the same way, so
functions that need one connection take :data:`Conn`, and those happy with a pool take
:data:`Executor`. SQL here passes JSON as text and reads it back as text (``$1::text::jsonb``,
``payload::text``) so it works whatever type codecs the pool was created with.
"""

from __future__ import annotations

import hashlib
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy
Executor: TypeAlias = Conn | asyncpg.Pool


def advisory_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name`` (the same in every process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
