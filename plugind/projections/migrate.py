"""Versioned SQL migrations, applied in order, once, under an advisory lock.

Every daemon runs :func:`migrate` at start, so several may race: the transaction-level advisory
lock makes them queue, and the second finds nothing left to do. Each file runs in the same
transaction as its ``schema_migrations`` row, so a failed migration leaves no trace.

Given a ``schema``, the tables go there (created if missing), whatever the connection's
``search_path``; a database where an earlier plugind kept its tables in ``public`` has them
moved into the schema first, so upgrading keeps the event log.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

from plugind.projections._db import Conn, advisory_key, quote_ident

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = advisory_key("plugind:migrate")
_NAME_RE = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
_CREATE_TABLE_RE = re.compile(r"^\s*CREATE TABLE (?:IF NOT EXISTS )?([a-z_][a-z0-9_]*)", re.M)


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    """The migrations shipped in ``plugind/projections/migrations``, by version."""
    found: list[Migration] = []
    folder = resources.files("plugind.projections") / "migrations"
    for entry in folder.iterdir():
        match = _NAME_RE.match(entry.name)
        if match:
            found.append(Migration(match[1], match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: int(m.version))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {versions}")
    return found


async def migrate(conn: Conn, *, schema: str | None = None) -> list[str]:
    """Apply the migrations this database lacks; returns the versions applied (oldest first).

    ``schema``: where plugind's tables live (created if missing); None keeps the connection's
    own ``search_path``.
    """
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        if schema is not None:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
            await conn.execute(f"SET LOCAL search_path TO {quote_ident(schema)}")
            await _adopt_legacy_tables(conn, schema)
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    text        PRIMARY KEY,
                name       text        NOT NULL,
                checksum   text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        done = {row["version"]: row["checksum"] for row in rows}
        for migration in available_migrations():
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    log.warning(
                        "Migration %s_%s changed after it was applied; not re-running it",
                        migration.version,
                        migration.name,
                    )
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied_now.append(migration.version)
            log.info("Applied database migration %s_%s", migration.version, migration.name)
    return applied_now


async def _adopt_legacy_tables(conn: Conn, schema: str) -> None:
    """Move an older plugind's tables from ``public`` into ``schema``, once.

    Only when ``schema`` has no ``schema_migrations`` yet and ``public`` holds plugind's own
    (its ``001_initial`` row and an ``event_log`` with a hash chain): tables of the same names
    that belong to other software (Dify's daemon has a ``plugins`` table) are never touched.
    """
    if schema == "public":
        return
    found = await conn.fetchval(
        """
        SELECT to_regclass(format('%I.schema_migrations', $1::text)) IS NULL
           AND to_regclass('public.schema_migrations') IS NOT NULL
           AND EXISTS (SELECT 1 FROM information_schema.columns
                       WHERE table_schema = 'public' AND table_name = 'event_log'
                         AND column_name = 'hash')
        """,
        schema,
    )
    if not found:
        return
    ours = await conn.fetchval(
        "SELECT count(*) FROM public.schema_migrations WHERE version = '001' AND name = 'initial'"
    )
    if not ours:
        return
    tables = ["schema_migrations"] + [
        name for m in available_migrations() for name in _CREATE_TABLE_RE.findall(m.sql)
    ]
    moved = []
    for table in tables:
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"public.{table}"):
            await conn.execute(f"ALTER TABLE public.{table} SET SCHEMA {quote_ident(schema)}")
            moved.append(table)
    log.warning(
        "Moved plugind's tables from schema public to schema %s: %s", schema, ", ".join(moved)
    )
