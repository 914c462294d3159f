"""Dify package signatures: verify them, and sign packages the way Dify does.

A signed `.difypkg` carries its signature in the zip comment, as the JSON object
``{"signature": "<base64>", "time": <unix seconds>}``. What is signed is the byte string

    SHA-256(C1) ‖ SHA-256(C2) ‖ … ‖ SHA-256(Cn) ‖ str(time)

where C1 … Cn are the inflated contents of the zip's file entries in the order of its central
directory (the order a zip reader lists them, not sorted), directory entries skipped (a name
ending in ``/``, a directory mode or the DOS directory flag, as Go decides), ``‖`` joins the raw
32-byte digests, and ``str(time)`` is the comment's ``time`` in ASCII decimal. Paths are not
hashed, so the signature binds the contents and their order, and the names only through the
Dify checksum that identifies the package. The signature is RSA, PKCS#1 v1.5 over the SHA-256
of that byte string, base64 with padding. Timestamps, compression and the comment itself are
not covered, so adding the comment changes neither the files nor the Dify checksum.

Newer Dify packages may hold ``.verification.dify.json`` (``{"authorized_category": ...}``:
``langgenius``, ``partner`` or ``community``). It is an ordinary file for the rule above, so it
is signed like the rest; when present its category is reported in :class:`SignatureInfo`.
:func:`sign_package` never adds one: Dify then treats a signed package as ``langgenius``.

Which keys are trusted is the operator's choice: the official Dify public key is not bundled.
Operators who want Dify marketplace packages add that key by path, like any third-party key
(``PLUGIN_SIGNATURE_PUBLIC_KEYS``). Keys are RSA public keys in PEM; Dify's own loader reads
only the PKCS#1 form (``BEGIN RSA PUBLIC KEY``), and we also accept ``BEGIN PUBLIC KEY``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from plugind.errors import ConfigError, PlugindError
from plugind.package import _zip

__all__ = [
    "VERIFICATION_FILE",
    "SignatureInfo",
    "load_public_keys",
    "sign_package",
    "verify_signature",
]

VERIFICATION_FILE = ".verification.dify.json"
_MAX_KEY_FILE = 64 * 1024
_MAX_VERIFICATION_FILE = 64 * 1024
_MAX_COMMENT = 0xFFFF
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22  # the end-of-central-directory record without its comment

_INT64 = range(-(2**63), 2**63)  # Dify reads the time as a Go int64


@dataclass(frozen=True, slots=True)
class SignatureInfo:
    """A verified signature: when it was made, which key matched, what Dify category."""

    signed_at: int
    key_index: int
    authorized_category: str | None = None


def verify_signature(
    data: bytes, public_keys: Sequence[bytes], *, max_uncompressed: int = 2**62
) -> SignatureInfo:
    """Check the Dify signature of the package ``data`` against ``public_keys`` (PEM).

    Raises ``signature_invalid`` when the package is not signed, its comment is not a Dify
    signature, or no key accepts it. A package that is not a safe zip raises what
    :func:`package.read_package` would (``invalid_package``, ``unsafe_package``); callers run
    that first, with its size limits, so ``max_uncompressed`` is only a backstop. A key that
    is not an RSA public key raises :class:`ValueError`: the configuration is wrong, not the
    package.
    """
    keys = [_public_key(pem, f"public key #{i}") for i, pem in enumerate(public_keys)]
    if not keys:
        raise ValueError("no public key to verify the package signature with")
    with _zip.open_zip(data) as zf:
        signature, signed_at = _parse_comment(zf.comment)
        message, category = _walk(zf, max_uncompressed, signed_at)
    for index, key in enumerate(keys):
        try:
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        return SignatureInfo(signed_at=signed_at, key_index=index, authorized_category=category)
    raise PlugindError(
        "signature_invalid",
        f"the package signature matches none of the {len(keys)} trusted public key(s): "
        "it was signed with another key, or its files changed after signing",
    )


def sign_package(data: bytes, private_key_pem: bytes, *, signed_at: int | None = None) -> bytes:
    """``data`` with a Dify signature in its zip comment, made with an RSA private key (PEM).

    Only the comment changes (an earlier signature is replaced), so the files, their order and
    the Dify checksum stay as they were. ``signed_at`` defaults to now.
    """
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the signing key is not an RSA private key")
    when = int(time.time()) if signed_at is None else signed_at
    with _zip.open_zip(data) as zf:
        message, _ = _walk(zf, 2**62, when)
        old_comment = zf.comment
    signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    comment = json.dumps(
        {"signature": base64.b64encode(signature).decode("ascii"), "time": when},
        separators=(",", ":"),
    ).encode("ascii")
    return _with_comment(data, old_comment, comment)


def load_public_keys(paths: Sequence[Path]) -> list[bytes]:
    """The PEM bytes of each RSA public key file; a bad file raises :class:`ConfigError`."""
    keys: list[bytes] = []
    for path in paths:
        try:
            with open(path, "rb") as key_file:
                pem = key_file.read(_MAX_KEY_FILE + 1)
        except OSError as exc:
            raise ConfigError(f"public key {str(path)!r} cannot be read: {exc}") from None
        if len(pem) > _MAX_KEY_FILE:
            raise ConfigError(f"public key {str(path)!r} is over {_MAX_KEY_FILE} bytes")
        try:
            _public_key(pem, f"public key {str(path)!r}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        keys.append(pem)
    return keys


def _public_key(pem: bytes, label: str) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{label} is not a PEM public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"{label} is not an RSA key; Dify signatures are RSA")
    return key


def _parse_comment(comment: bytes) -> tuple[bytes, int]:
    """The raw signature and the signing time from a zip comment, or ``signature_invalid``."""
    if not comment.strip():
        raise PlugindError("signature_invalid", "the package is not signed (no zip comment)")
    try:
        fields: Any = json.loads(comment)
    except (ValueError, UnicodeDecodeError):
        raise PlugindError(
            "signature_invalid",
            f"the package's zip comment is not a Dify signature (not JSON): {comment[:80]!r}",
        ) from None
    if not isinstance(fields, dict):
        raise PlugindError(
            "signature_invalid", "the package's zip comment is not a Dify signature object"
        )
    encoded, signed_at = fields.get("signature"), fields.get("time")
    if not isinstance(encoded, str) or not encoded:
        raise PlugindError(
            "signature_invalid", "the package's zip comment has no 'signature' string"
        )
    if not isinstance(signed_at, int) or isinstance(signed_at, bool) or signed_at not in _INT64:
        raise PlugindError(
            "signature_invalid", "the package's zip comment has no integer 'time' (unix seconds)"
        )
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise PlugindError(
            "signature_invalid", "the package's 'signature' is not valid base64"
        ) from None
    return signature, signed_at


def _walk(zf: zipfile.ZipFile, max_uncompressed: int, signed_at: int) -> tuple[bytes, str | None]:
    """The signed byte string, and the authorized category of a verification file if any."""
    entries = _zip.checked_entries(zf, max_uncompressed=max_uncompressed)
    parts: list[bytes] = []
    category: str | None = None
    for entry in entries:
        if entry.is_dir:
            continue
        if entry.name == VERIFICATION_FILE:
            content = _zip.read_entry(zf, entry, limit=_MAX_VERIFICATION_FILE)
            category = _authorized_category(content)
            parts.append(hashlib.sha256(content).digest())
            continue
        digest = hashlib.sha256()
        for chunk in _zip.iter_content(zf, entry):
            digest.update(chunk)
        parts.append(digest.digest())
    parts.append(str(signed_at).encode("ascii"))
    return b"".join(parts), category


def _authorized_category(content: bytes) -> str | None:
    # Dify refuses every signature of a package whose verification file it cannot decode.
    try:
        fields: Any = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        fields = None
    category = fields.get("authorized_category") if isinstance(fields, dict) else None
    if not isinstance(fields, dict) or not isinstance(category, str | None):
        raise PlugindError(
            "signature_invalid",
            f"the package's {VERIFICATION_FILE} is not a JSON object with a string "
            "'authorized_category'",
        )
    return category


def _with_comment(data: bytes, old_comment: bytes, comment: bytes) -> bytes:
    """``data`` with its zip comment replaced, every other byte kept."""
    if len(comment) > _MAX_COMMENT:
        raise ValueError("the signature comment is too long for a zip comment")
    start = len(data) - len(old_comment) - _EOCD_SIZE
    record = data[start : start + _EOCD_SIZE]
    if (
        start < 0
        or record[:4] != _EOCD
        or struct.unpack("<H", record[20:22])[0] != len(old_comment)
    ):
        # The comment is not the last thing in the file: bytes trail the zip.
        raise PlugindError(
            "invalid_package", "the package has bytes after its zip end record; rebuild it"
        )
    return data[: start + 20] + struct.pack("<H", len(comment)) + comment
