"""``GET /plugin/{tenant}/asset/{id}``: a file of a package's ``_assets/`` (icons, mostly).

An asset id names the package by sha256 and the file by a hash of its path
(:func:`declarations.asset_id`), so serving one is: load the package from the store, find the
file. Packages are immutable, so what was found is cached (by id, bounded in bytes).
"""

from __future__ import annotations

import mimetypes
from collections import OrderedDict
from typing import Final

import anyio

from plugind.dify import declarations
from plugind.package import _zip
from plugind.projections._db import Executor
from plugind.projections.package_store import get_package

MAX_ASSET_SIZE: Final = 8 * 1024 * 1024


class AssetCache:
    """A small LRU of asset bytes by id, bounded in bytes."""

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._max = max_bytes
        self._size = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self._max // 4 or key in self._items:
            return
        self._items[key] = value
        self._size += len(value)
        while self._size > self._max:
            _, dropped = self._items.popitem(last=False)
            self._size -= len(dropped)


async def load_asset(db: Executor, cache: AssetCache, asset_id: str) -> bytes | None:
    """The bytes of an asset, or None if no stored package has it."""
    cached = cache.get(asset_id)
    if cached is not None:
        return cached
    parsed = declarations.parse_asset_id(asset_id)
    if parsed is None:
        return None
    sha256, wanted = parsed
    package = await get_package(db, sha256)
    if package is None:
        return None
    found = await anyio.to_thread.run_sync(_find, package.data, wanted)
    if found is not None:
        cache.put(asset_id, found)
    return found


def _find(data: bytes, wanted: str) -> bytes | None:
    with _zip.open_zip(data) as zf:
        entries = _zip.checked_entries(zf, max_uncompressed=2**40)
        for entry in entries:
            if entry.is_dir or not entry.name.startswith(declarations.ASSETS_DIR):
                continue
            if declarations.path_hash(entry.name) == wanted:
                return _zip.read_entry(zf, entry, limit=MAX_ASSET_SIZE)
    return None


def read_file(data: bytes, paths: tuple[str, ...], limit: int = MAX_ASSET_SIZE) -> bytes | None:
    """The first of ``paths`` that the package ``data`` holds, or None."""
    with _zip.open_zip(data) as zf:
        entries = {e.name: e for e in _zip.checked_entries(zf, max_uncompressed=2**40)}
        for path in paths:
            entry = entries.get(path)
            if entry is not None and not entry.is_dir:
                return _zip.read_entry(zf, entry, limit=limit)
    return None


def media_type(asset_id: str) -> str:
    guessed, _ = mimetypes.guess_type(asset_id)
    return guessed or "application/octet-stream"
