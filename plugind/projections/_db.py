"""How plugind connects to Postgres, and type aliases for the asyncpg objects it passes around.

A pool's ``acquire()`` yields a proxy, not a ``Connection``; both run queries the same way, so
functions that need one connection take :data:`Conn`, and those happy with a pool take
:data:`Executor`. SQL here passes JSON as text and reads it back as text (``$1::text::jsonb``,
``payload::text``) so it works whatever type codecs the pool was created with.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy
Executor: TypeAlias = Conn | asyncpg.Pool

# plugind keeps its tables in a schema of its own, so it can share a database with other
# software (Dify's daemon keeps `plugins`, `install_tasks`... in `public`). Every connection
# plugind opens sets `search_path` to that schema alone: SQL stays unqualified, and a table of
# the same name in another schema is never seen.
DEFAULT_SCHEMA: Final = "plugind"


def schema_settings(schema: str) -> dict[str, str]:
    """asyncpg ``server_settings`` for a connection that works in ``schema``.

    Sent at start-up, so ``RESET ALL`` (which a pool runs when a connection is released)
    returns to it.
    """
    return {"search_path": quote_ident(schema)}


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def connect(url: str, *, schema: str = DEFAULT_SCHEMA, **options: Any) -> asyncpg.Connection:
    """A connection to plugind's database, working in plugind's schema."""
    connection: asyncpg.Connection = await asyncpg.connect(
        url, server_settings=schema_settings(schema), **options
    )
    return connection


async def create_pool(url: str, *, schema: str = DEFAULT_SCHEMA, **options: Any) -> asyncpg.Pool:
    """A connection pool on plugind's database, every connection in plugind's schema."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        url, server_settings=schema_settings(schema), **options
    )
    return pool


def advisory_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name`` (the same in every process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_UNREACHABLE: Final = (
    OSError,  # refused, reset, timed out (TimeoutError is an OSError)
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # e.g. a proxy asyncpg detached when its connection was lost
    asyncpg.exceptions.AdminShutdownError,  # terminated by an operator or a restart
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,  # starting up or shutting down
    # asyncpg's protocol left in an impossible state, as when the server ends a session
    # between two queries: only a fresh connection helps
    asyncpg.exceptions.InternalClientError,
)


def postgres_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says Postgres, or our connection to it, is gone rather than that a query
    failed: the first kind is waited out with a fresh connection, the second is the query's fault.
    """
    return isinstance(exc, _UNREACHABLE) and not isinstance(exc, asyncpg.exceptions.DataError)
