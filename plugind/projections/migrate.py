"""Versioned SQL migrations, applied in order, once, under an advisory lock.

Every daemon runs :func:`migrate` at start, so several may race: the transaction-level advisory
lock makes them queue, and the second finds nothing left to do. Each file runs in the same
transaction as its ``schema_migrations`` row, so a failed migration leaves no trace.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

from plugind.projections._db import Conn, advisory_key

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = advisory_key("plugind:migrate")
_NAME_RE = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")


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


async def migrate(conn: Conn) -> list[str]:
    """Apply the migrations this database lacks; returns the versions applied (oldest first)."""
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
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
