"""Extracting a verified package into its install folder, atomically.

A plugin folder is either complete or absent: the package is unpacked into a temporary folder
beside the destination and renamed into place, with a marker written last. A crash halfway
leaves only a temporary folder, never a half-filled install folder that a later start would
trust. Two extractions racing for the same destination both succeed; one rename wins.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from plugind.errors import PlugindError
from plugind.package import _zip
from plugind.package.difypkg import PluginPackage

MARKER = ".plugind-extracted"  # holds the package checksum; written last


def is_extracted(package: PluginPackage, dest: Path) -> bool:
    """Whether ``dest`` holds a complete extraction of ``package``."""
    try:
        return (dest / MARKER).read_text("ascii").strip() == package.checksum
    except (OSError, UnicodeDecodeError):
        return False


def extract(package: PluginPackage, dest: Path) -> None:
    """Unpack ``package`` into ``dest``; no entry can land outside it. Idempotent."""
    dest = Path(dest)
    if is_extracted(package, dest):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        _unpack(package, staging)
        (staging / MARKER).write_text(package.checksum, "ascii")
        _move_into_place(package, staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack(package: PluginPackage, root: Path) -> None:
    real_root = root.resolve()
    with _zip.open_zip(package.data) as zf:
        # Checked again although read_package did: this is the step that writes to disk.
        entries = _zip.checked_entries(zf, max_uncompressed=2**62)
        for entry in entries:
            target = real_root.joinpath(*entry.name.split("/"))
            if not target.resolve().is_relative_to(real_root):
                raise PlugindError(
                    "unsafe_package", f"entry {entry.name!r} would land outside {root}"
                )
            if entry.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            mode = 0o755 if entry.executable else 0o644
            flags = (
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
            )
            fd = os.open(target, flags, mode)
            with os.fdopen(fd, "wb") as out:
                for chunk in _zip.iter_content(zf, entry):
                    out.write(chunk)


def _move_into_place(package: PluginPackage, staging: Path, dest: Path) -> None:
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        if is_extracted(package, dest):
            return  # another extraction finished first
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            dest.rename(old)
    try:
        staging.rename(dest)
    except OSError:
        if not is_extracted(package, dest):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
