"""Dify plugin packages (`.difypkg`): verify, identify, describe, build.

A package is a zip with ``manifest.yaml`` at its root. It is known by its unique identifier
``author/name:version@checksum``, where the checksum is Dify's (:func:`dify_checksum`), so
plugind and Dify agree on which package is which, and by the sha256 of its bytes, the key of
our package store. Everything here is pure and synchronous: callers on the event loop run
:func:`read_package` in a worker thread, since hashing a 50 MiB package takes a moment.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugind.errors import PlugindError, TooLarge
from plugind.messages import ManifestSummary
from plugind.package import _zip
from plugind.package._build import build_package, package_files
from plugind.package._manifest import build_declaration, parse_yaml, validate_manifest

__all__ = [
    "PluginPackage",
    "build_package",
    "dify_checksum",
    "install_dir",
    "package_files",
    "parse_identifier",
    "read_package",
]

MAX_YAML_SIZE = 4 * 1024 * 1024
UNCOMPRESSED_FACTOR = 8  # default inflated-size cap, as a multiple of the package size cap

# Dify's PluginUniqueIdentifier, with the author required (plugind always has one).
_IDENTIFIER_RE = re.compile(
    r"^(?P<author>[a-z0-9_-]{1,64})/(?P<name>[a-z0-9_-]{1,128})"
    r":(?P<version>\d{1,4}(?:\.\d{1,4}){1,3}(?:-\w{1,16})?)"
    r"@(?P<checksum>[a-f0-9]{32,64})$",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class PluginPackage:
    """A verified package: its bytes, identities, manifest and Dify declaration."""

    data: bytes = field(repr=False)
    sha256: str
    checksum: str
    author: str
    name: str
    version: str
    manifest: dict[str, Any] = field(repr=False)
    declaration: dict[str, Any] = field(repr=False)
    tools: tuple[str, ...] = ()

    @property
    def plugin_id(self) -> str:
        return f"{self.author}/{self.name}"

    @property
    def identifier(self) -> str:
        return f"{self.author}/{self.name}:{self.version}@{self.checksum}"

    @property
    def entrypoint(self) -> str:
        entrypoint: str = self.manifest["meta"]["runner"]["entrypoint"]
        return entrypoint

    def summary(self) -> ManifestSummary:
        """The manifest fields that go into ``plugin.installed``."""
        return ManifestSummary(
            label=self.manifest.get("label"),
            description=self.manifest.get("description"),
            author=self.author,
            runner=dict(self.manifest["meta"]["runner"]),
            tools=list(self.tools),
        )


class _ZipYaml:
    """The package's YAML files, read on demand for the declaration."""

    def __init__(self, zf: Any, entries: dict[str, _zip.Entry]) -> None:
        self._zf = zf
        self._entries = entries

    @property
    def files(self) -> Collection[str]:
        return self._entries.keys()

    def load(self, path: str, purpose: str) -> Any:
        entry = self._entries.get(path)
        if entry is None:
            raise PlugindError("invalid_package", f"{path} ({purpose}) is not in the package")
        return parse_yaml(_zip.read_entry(self._zf, entry, limit=MAX_YAML_SIZE), path)


def read_package(
    data: bytes,
    *,
    max_size: int,
    max_uncompressed: int | None = None,
    max_entries: int = _zip.MAX_ENTRIES,
) -> PluginPackage:
    """Verify ``data`` as a `.difypkg` and describe it.

    Raises :class:`TooLarge` (``package_too_large``) over ``max_size`` bytes, else
    :class:`PlugindError` with ``unsafe_package`` (paths escaping the package, links, zip bombs:
    more than ``max_entries`` entries or more than ``max_uncompressed`` inflated bytes, by
    default ``8 × max_size``) or ``invalid_package`` (not a zip, a missing or wrong manifest, a
    provider file it names is missing or broken), each with a message naming the problem.
    """
    if len(data) > max_size:
        raise TooLarge(
            "package_too_large", f"the package is {len(data)} bytes; the limit is {max_size}"
        )
    limit = max_uncompressed if max_uncompressed is not None else max_size * UNCOMPRESSED_FACTOR
    with _zip.open_zip(data) as zf:
        entries = _zip.checked_entries(zf, max_entries=max_entries, max_uncompressed=limit)
        files = {e.name: e for e in entries if not e.is_dir}
        source = _ZipYaml(zf, files)
        if "manifest.yaml" not in files:
            raise PlugindError("invalid_package", "the package has no manifest.yaml at its root")
        manifest = validate_manifest(source.load("manifest.yaml", "the manifest"), set(files))
        declaration, tools = build_declaration(manifest, source)
        checksum = _zip.checksum(zf, entries)
    return PluginPackage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        checksum=checksum,
        author=manifest["author"],
        name=manifest["name"],
        version=manifest["version"],
        manifest=manifest,
        declaration=declaration,
        tools=tuple(tools),
    )


def dify_checksum(data: bytes) -> str:
    """Dify's checksum of a package, as its daemon computes it (``decoder.CalculateChecksum``).

    For every file entry of the zip (directory entries skipped: names ending in ``/`` or
    with a directory mode), take its path P (UTF-8 bytes, ``/``-separated, as stored) and
    its inflated content C. Sort the entries by P, comparing bytes. The checksum is the
    lowercase hex of ``SHA-256( SHA-256(P1) ‖ SHA-256(C1) ‖ SHA-256(P2) ‖ SHA-256(C2) ‖ … )``,
    where ``‖`` joins the 32-byte raw digests. Zip metadata (timestamps, compression, the
    comment where Dify keeps a signature) does not count, so re-zipping the same files
    keeps the checksum. The entries are checked as in :func:`read_package` first.
    """
    with _zip.open_zip(data) as zf:
        entries = _zip.checked_entries(zf, max_uncompressed=2**62)
        return _zip.checksum(zf, entries)


def parse_identifier(identifier: str) -> tuple[str, str, str, str]:
    """``author/name:version@checksum`` → ``(author, name, version, checksum)``.

    A malformed identifier raises ``unknown_plugin``: no plugin can have that name.
    """
    match = _IDENTIFIER_RE.match(identifier)
    if match is None:
        raise PlugindError(
            "unknown_plugin",
            f"malformed plugin identifier {identifier[:200]!r}: "
            "expected author/name:version@checksum",
        )
    return match["author"], match["name"], match["version"], match["checksum"]


def install_dir(plugin_dir: Path, identifier: str) -> Path:
    """Where a package is extracted: ``PLUGIN_DIR/<author>/<name>-<version>@<checksum>``."""
    author, name, version, checksum = parse_identifier(identifier)
    return Path(plugin_dir) / author / f"{name}-{version}@{checksum}"
