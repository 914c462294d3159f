"""The content-addressed package store in Postgres (table ``packages``).

Any node that lacks a plugin materialises it from here on first use, so adding nodes needs no
shared disk. Rows are immutable: a sha256 names exactly one byte string, so storing twice is a
no-op and a reader never sees a half-written package.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from plugind.errors import PlugindError
from plugind.package.difypkg import PluginPackage
from plugind.projections._db import Executor


@dataclass(frozen=True, slots=True)
class StoredPackage:
    sha256: str
    identifier: str
    size: int
    declaration: dict[str, Any]
    data: bytes


async def put_package(
    pool_or_conn: Executor,
    *,
    sha256: str,
    identifier: str,
    declaration: dict[str, Any],
    data: bytes,
) -> bool:
    """Store a package unless it is already there; True if this call stored it.

    Raises ``PlugindError("checksum_mismatch")`` if ``sha256`` is not the digest of ``data``:
    a content-addressed store must never hold bytes under another content's name.
    """
    sha256 = sha256.lower()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise PlugindError("checksum_mismatch", f"package bytes have sha256 {actual}, not {sha256}")
    stored = await pool_or_conn.fetchval(
        """
        INSERT INTO packages (sha256, identifier, size, declaration, data)
        VALUES ($1, $2, $3, $4::text::jsonb, $5)
        ON CONFLICT (sha256) DO NOTHING
        RETURNING true
        """,
        sha256,
        identifier,
        len(data),
        orjson.dumps(declaration, option=orjson.OPT_NON_STR_KEYS).decode(),
        data,
    )
    return bool(stored)


async def store_package(pool_or_conn: Executor, package: PluginPackage) -> bool:
    """:func:`put_package` for a verified package."""
    return await put_package(
        pool_or_conn,
        sha256=package.sha256,
        identifier=package.identifier,
        declaration=package.declaration,
        data=package.data,
    )


_SELECT = "SELECT sha256, identifier, size, declaration::text AS declaration, data FROM packages"


def _row(row: Any) -> StoredPackage | None:
    if row is None:
        return None
    return StoredPackage(
        sha256=row["sha256"],
        identifier=row["identifier"],
        size=int(row["size"]),
        declaration=orjson.loads(row["declaration"]),
        data=bytes(row["data"]),
    )


async def get_package(pool_or_conn: Executor, sha256: str) -> StoredPackage | None:
    return _row(await pool_or_conn.fetchrow(f"{_SELECT} WHERE sha256 = $1", sha256.lower()))


async def get_package_by_identifier(
    pool_or_conn: Executor, identifier: str
) -> StoredPackage | None:
    """The package with this ``author/name:version@checksum`` (the newest, if stored twice)."""
    return _row(
        await pool_or_conn.fetchrow(
            f"{_SELECT} WHERE identifier = $1 ORDER BY created_at DESC LIMIT 1", identifier
        )
    )


@dataclass(frozen=True, slots=True)
class PackageLooks:
    """How a package shows in a list: its declaration's ``label``, ``icon`` and ``icon_dark``."""

    label: Any
    icon: str | None
    icon_dark: str | None


async def package_looks(pool_or_conn: Executor, sha256s: Sequence[str]) -> dict[str, PackageLooks]:
    """The looks of each of these packages that is stored, by sha256 (without their bytes)."""
    rows = await pool_or_conn.fetch(
        """
        SELECT sha256, (declaration->'label')::text AS label, declaration->>'icon' AS icon,
               declaration->>'icon_dark' AS icon_dark
        FROM packages WHERE sha256 = ANY($1::text[])
        """,
        list(set(sha256s)),
    )
    return {
        row["sha256"]: PackageLooks(
            label=orjson.loads(row["label"]) if row["label"] else None,
            icon=row["icon"],
            icon_dark=row["icon_dark"],
        )
        for row in rows
    }
