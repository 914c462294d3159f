"""Zipping a plugin folder into a `.difypkg`.

The output depends on the files' paths and contents only (fixed timestamps, fixed modes,
sorted entries, one compression level), so packaging the same folder twice gives the same
bytes and therefore the same identifier: a rebuilt package is recognised as already installed.

Which files go in follows Dify's packager: everything under the folder except what
``.difyignore`` (or, without one, ``.gitignore``) excludes, with gitignore semantics. Local
environments, caches and earlier packages are always left out, because packaging a folder you
have been testing in must not ship its ``.venv``.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pathspec

from plugind.errors import PlugindError

ALWAYS_SKIPPED_DIRS = frozenset({".venv", "__pycache__", ".git"})
ALWAYS_SKIPPED_SUFFIXES = (".pyc", ".difypkg")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold


def _ignore_spec(root: Path) -> pathspec.GitIgnoreSpec:
    for name in (".difyignore", ".gitignore"):
        path = root / name
        if path.is_file():
            return pathspec.GitIgnoreSpec.from_lines(path.read_text("utf-8").splitlines())
    return pathspec.GitIgnoreSpec.from_lines([])


def package_files(source_dir: Path) -> list[tuple[str, Path]]:
    """The ``(path in the package, file)`` pairs :func:`build_package` zips, sorted by path."""
    root = source_dir.resolve()
    spec = _ignore_spec(root)
    found: list[tuple[str, Path]] = []
    for current, dirs, names in os.walk(root):
        here = Path(current)
        rel_dir = here.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        kept: list[str] = []
        for name in sorted(dirs):
            rel = prefix + name
            if (
                name in ALWAYS_SKIPPED_DIRS
                or spec.match_file(rel + "/")
                or (here / name).is_symlink()
            ):
                continue
            kept.append(name)
        dirs[:] = kept
        for name in names:
            rel = prefix + name
            if name.endswith(ALWAYS_SKIPPED_SUFFIXES) or spec.match_file(rel):
                continue
            path = here / name
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root):
                    raise PlugindError(
                        "invalid_package",
                        f"{rel} is a symlink to {target}, outside the plugin folder",
                    )
            if not path.is_file():
                continue
            found.append((rel, path))
    found.sort(key=lambda item: item[0].encode("utf-8"))
    return found


def build_package(source_dir: Path) -> bytes:
    """Zip the plugin folder ``source_dir`` into `.difypkg` bytes, deterministically."""
    source_dir = Path(source_dir)
    if not (source_dir / "manifest.yaml").is_file():
        raise PlugindError("invalid_package", f"{source_dir} has no manifest.yaml")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for rel, path in package_files(source_dir):
            info = zipfile.ZipInfo(rel, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            zf.writestr(info, path.read_bytes(), compresslevel=6)
    return buffer.getvalue()
