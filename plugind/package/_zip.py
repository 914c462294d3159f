"""Reading a `.difypkg` zip without trusting it.

A package comes from whoever can publish an install command, so every entry is checked before
anything is decompressed or written: names that could escape the install folder, symlinks and
device files, duplicate names (two contents for one path would make the checksum ambiguous),
and zip bombs (too many entries, too many bytes once inflated, an absurd compression ratio).
Sizes come from the central directory, and :mod:`zipfile` never inflates an entry past its
declared size, so the declared total really bounds what we write and hash.
"""

from __future__ import annotations

import hashlib
import io
import re
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

from plugind.errors import PlugindError

MAX_ENTRIES = 10_000
MAX_RATIO = 250  # deflate tops out near 1032:1; real source and wheels stay far below 250:1
RATIO_MIN_SIZE = 1024 * 1024  # small files may compress absurdly well without harm
MAX_NAME_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255
_READ_CHUNK = 1024 * 1024

_DRIVE = re.compile(r"^[A-Za-z]:")
_UNIX_CREATORS = (3, 19)  # Unix, macOS: external_attr's high 16 bits are a st_mode
_DOS_CREATORS = (0, 11, 14)  # FAT, NTFS, VFAT: external_attr's low byte holds DOS flags
_DOS_DIRECTORY = 0x10


@dataclass(frozen=True, slots=True)
class Entry:
    """One checked zip entry: its UTF-8 ``name`` (``/``-separated, relative) and zip info."""

    name: str
    info: zipfile.ZipInfo
    is_dir: bool

    @property
    def executable(self) -> bool:
        return bool((self.info.external_attr >> 16) & 0o111)


def open_zip(data: bytes) -> zipfile.ZipFile:
    """Open ``data`` as a zip, or raise ``invalid_package``."""
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise PlugindError(
            "invalid_package", f"the package is not a valid zip file: {exc}"
        ) from None
    except (OSError, ValueError, EOFError) as exc:
        raise PlugindError("invalid_package", f"the package zip cannot be read: {exc}") from None


def is_dir(info: zipfile.ZipInfo) -> bool:
    """Whether an entry is a directory, decided the way Go's ``archive/zip`` decides it.

    Dify's daemon is written in Go, and its checksum skips what Go calls a directory: a name
    ending in ``/``, a Unix mode with the directory bit, or the DOS directory flag.
    """
    if info.filename.endswith("/"):
        return True
    if info.create_system in _UNIX_CREATORS:
        return stat.S_ISDIR(info.external_attr >> 16)
    if info.create_system in _DOS_CREATORS:
        return bool(info.external_attr & _DOS_DIRECTORY)
    return False


def _name(info: zipfile.ZipInfo) -> str:
    """The entry's name as the UTF-8 text Dify sees; non-UTF-8 names are refused."""
    raw_name = info.orig_filename
    if "\x00" in raw_name:
        raise PlugindError("unsafe_package", f"entry name {raw_name!r} contains a NUL byte")
    # zipfile decodes names without the UTF-8 flag as cp437; undo that to get the raw bytes.
    raw = raw_name.encode("utf-8") if info.flag_bits & 0x800 else raw_name.encode("cp437")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PlugindError("invalid_package", f"entry name {raw!r} is not UTF-8 text") from None


def check_name(name: str, *, directory: bool) -> tuple[str, ...]:
    """The path segments of a safe relative entry name, or ``unsafe_package``."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise PlugindError("unsafe_package", f"entry name {name[:80]!r} is empty or too long")
    if "\\" in name or name.startswith("/") or _DRIVE.match(name):
        raise PlugindError(
            "unsafe_package", f"entry {name!r} has an absolute or Windows-style path"
        )
    body = name[:-1] if directory and name.endswith("/") else name
    parts = tuple(body.split("/"))
    for part in parts:
        if part == "..":
            raise PlugindError(
                "unsafe_package", f"entry {name!r} climbs out of the package with '..'"
            )
        if part in ("", "."):
            raise PlugindError("unsafe_package", f"entry {name!r} has an empty or '.' path segment")
        if len(part) > MAX_SEGMENT_LENGTH:
            raise PlugindError(
                "unsafe_package", f"entry {name!r} has a path segment over 255 characters"
            )
    return parts


def _check_type(name: str, info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise PlugindError("unsafe_package", f"entry {name!r} is a symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise PlugindError("unsafe_package", f"entry {name!r} is not a regular file or folder")
    if info.flag_bits & 0x1:
        raise PlugindError("invalid_package", f"entry {name!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise PlugindError(
            "invalid_package",
            f"entry {name!r} uses compression method {info.compress_type}; "
            "only stored and deflated entries are supported",
        )


def checked_entries(
    zf: zipfile.ZipFile, *, max_entries: int = MAX_ENTRIES, max_uncompressed: int
) -> list[Entry]:
    """Every entry of ``zf``, each checked; raises ``unsafe_package`` or ``invalid_package``."""
    infos = zf.infolist()
    if len(infos) > max_entries:
        raise PlugindError(
            "unsafe_package", f"the package has {len(infos)} entries; the limit is {max_entries}"
        )
    entries: list[Entry] = []
    seen: set[str] = set()
    files: set[tuple[str, ...]] = set()
    total = 0
    for info in infos:
        name = _name(info)
        directory = is_dir(info)
        parts = check_name(name, directory=directory)
        _check_type(name, info)
        key = "/".join(parts)
        if key in seen:
            raise PlugindError("unsafe_package", f"entry {key!r} appears more than once")
        seen.add(key)
        if not directory:
            files.add(parts)
            total += info.file_size
            if total > max_uncompressed:
                raise PlugindError(
                    "unsafe_package",
                    f"the package inflates to more than {max_uncompressed} bytes "
                    "(a zip bomb, or far too big)",
                )
            if info.file_size > RATIO_MIN_SIZE and info.file_size > MAX_RATIO * max(
                info.compress_size, 1
            ):
                raise PlugindError(
                    "unsafe_package",
                    f"entry {key!r} inflates {info.file_size // max(info.compress_size, 1)}:1 "
                    f"to {info.file_size} bytes (a zip bomb)",
                )
        entries.append(Entry(name=key, info=info, is_dir=directory))
    for parts in files:
        for depth in range(1, len(parts)):
            if parts[:depth] in files:
                inner, outer = "/".join(parts), "/".join(parts[:depth])
                raise PlugindError(
                    "invalid_package", f"entry {inner!r} is inside {outer!r}, which is a file"
                )
    return entries


def iter_content(zf: zipfile.ZipFile, entry: Entry) -> Iterator[bytes]:
    """The inflated bytes of ``entry`` in chunks; a corrupt entry raises ``invalid_package``."""
    try:
        with zf.open(entry.info) as stream:
            while chunk := stream.read(_READ_CHUNK):
                yield chunk
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise PlugindError("invalid_package", f"entry {entry.name!r} is corrupt: {exc}") from None


def read_entry(zf: zipfile.ZipFile, entry: Entry, *, limit: int) -> bytes:
    """The whole content of a small entry (a YAML file), refusing anything over ``limit``."""
    if entry.info.file_size > limit:
        raise PlugindError(
            "invalid_package", f"{entry.name} is {entry.info.file_size} bytes; the limit is {limit}"
        )
    return b"".join(iter_content(zf, entry))


def checksum(zf: zipfile.ZipFile, entries: list[Entry]) -> str:
    """Dify's checksum over the file entries of ``zf`` (see :func:`package.dify_checksum`)."""
    parts: list[tuple[bytes, bytes]] = []
    for entry in entries:
        if entry.is_dir:
            continue
        content = hashlib.sha256()
        for chunk in iter_content(zf, entry):
            content.update(chunk)
        path = entry.name.encode("utf-8")
        parts.append((path, content.digest()))
    parts.sort(key=lambda item: item[0])
    outer = hashlib.sha256()
    for path, digest in parts:
        outer.update(hashlib.sha256(path).digest())
        outer.update(digest)
    return outer.hexdigest()
