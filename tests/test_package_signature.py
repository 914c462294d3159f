"""Package signatures: Dify's signed-data rule, signing, verifying, key files."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from plugin_factory import ECHO, write_plugin

from plugind.errors import ConfigError, PlugindError
from plugind.package.difypkg import build_package, dify_checksum, read_package
from plugind.package.signature import (
    VERIFICATION_FILE,
    load_public_keys,
    sign_package,
    verify_signature,
)

MiB = 1024 * 1024
SIGNED_AT = 1_735_689_600


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # "RSA PRIVATE KEY", as Dify keeps it
        serialization.NoEncryption(),
    )


def _public_pem(key: rsa.RSAPrivateKey, fmt: serialization.PublicFormat) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, fmt)


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = write_plugin(tmp_path_factory.mktemp("plugin") / "p", tools={"echo": ECHO})
    return build_package(folder)


def pkcs1(key: rsa.RSAPrivateKey) -> bytes:
    """Dify's public key format: ``BEGIN RSA PUBLIC KEY``."""
    return _public_pem(key, serialization.PublicFormat.PKCS1)


def independent_signed_data(data: bytes) -> tuple[bytes, bytes]:
    """(signed bytes, signature) rebuilt from the zip without plugind's code.

    The rule: sha256 of every file's content in central-directory order (directories
    skipped), then the comment's ``time`` in decimal.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        comment = json.loads(zf.comment)
        digests = [hashlib.sha256(zf.read(i)).digest() for i in zf.infolist() if not i.is_dir()]
    message = b"".join(digests) + str(comment["time"]).encode()
    return message, base64.b64decode(comment["signature"])


def rezip(
    data: bytes,
    *,
    order: list[str] | None = None,
    change: str | None = None,
    extra: dict[str, bytes] | None = None,
    comment: bytes | None = None,
) -> bytes:
    """``data`` zipped again: entries in ``order``, one byte of ``change`` flipped, the comment
    kept unless given."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        infos = {i.filename: i for i in src.infolist()}
        for name in order or list(infos):
            content = src.read(infos[name])
            if name == change:
                content = bytes([content[0] ^ 1]) + content[1:]
            dst.writestr(infos[name], content)
        for name, content in (extra or {}).items():
            dst.writestr(name, content)
        dst.comment = src.comment if comment is None else comment
    return out.getvalue()


def assert_invalid(data: bytes, keys: list[bytes], *words: str) -> str:
    with pytest.raises(PlugindError) as caught:
        verify_signature(data, keys)
    assert caught.value.code == "signature_invalid"
    for word in words:
        assert word in caught.value.message
    return caught.value.message


def test_a_signed_package_verifies(package: bytes, keys: list[rsa.RSAPrivateKey]) -> None:
    signed = sign_package(package, _private_pem(keys[0]), signed_at=SIGNED_AT)
    info = verify_signature(signed, [pkcs1(keys[0])])
    assert (info.signed_at, info.key_index, info.authorized_category) == (SIGNED_AT, 0, None)


def test_the_matching_key_may_be_any_of_several(
    package: bytes, keys: list[rsa.RSAPrivateKey]
) -> None:
    signed = sign_package(package, _private_pem(keys[1]), signed_at=SIGNED_AT)
    spki = _public_pem(keys[1], serialization.PublicFormat.SubjectPublicKeyInfo)
    assert verify_signature(signed, [pkcs1(keys[0]), pkcs1(keys[1])]).key_index == 1
    assert verify_signature(signed, [pkcs1(keys[2]), spki, pkcs1(keys[0])]).key_index == 1


def test_signed_data_follows_difys_rule(package: bytes, keys: list[rsa.RSAPrivateKey]) -> None:
    signed = sign_package(package, _private_pem(keys[0]), signed_at=SIGNED_AT)
    message, signature = independent_signed_data(signed)
    keys[0].public_key().verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    comment = json.loads(zipfile.ZipFile(io.BytesIO(signed)).comment)
    assert comment == {"signature": base64.b64encode(signature).decode(), "time": SIGNED_AT}


def test_files_are_hashed_in_zip_order_not_sorted(
    package: bytes, keys: list[rsa.RSAPrivateKey]
) -> None:
    names = zipfile.ZipFile(io.BytesIO(package)).namelist()
    reordered = rezip(package, order=names[::-1])
    signed = sign_package(reordered, _private_pem(keys[0]), signed_at=SIGNED_AT)
    message, signature = independent_signed_data(signed)
    keys[0].public_key().verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    assert verify_signature(signed, [pkcs1(keys[0])]).signed_at == SIGNED_AT
    # the same files in another order no longer match the signature
    back_in_order = rezip(signed, order=names)
    assert_invalid(back_in_order, [pkcs1(keys[0])], "matches none")


def test_signing_keeps_the_package_and_its_checksum(
    package: bytes, keys: list[rsa.RSAPrivateKey]
) -> None:
    signed = sign_package(package, _private_pem(keys[0]), signed_at=SIGNED_AT)
    before, after = read_package(package, max_size=MiB), read_package(signed, max_size=MiB)
    assert after.checksum == before.checksum == dify_checksum(signed)
    assert after.identifier == before.identifier
    assert signed.startswith(package[:-2])  # only the comment length and comment differ
    resigned = sign_package(signed, _private_pem(keys[1]), signed_at=SIGNED_AT + 1)
    assert len(resigned) == len(signed)  # the old signature replaced, not appended to
    assert verify_signature(resigned, [pkcs1(keys[1])]).signed_at == SIGNED_AT + 1
    assert_invalid(resigned, [pkcs1(keys[0])], "matches none")


def test_signing_time_defaults_to_now(package: bytes, keys: list[rsa.RSAPrivateKey]) -> None:
    signed = sign_package(package, _private_pem(keys[0]))
    assert verify_signature(signed, [pkcs1(keys[0])]).signed_at > SIGNED_AT


def test_an_unsigned_package_is_refused(package: bytes, keys: list[rsa.RSAPrivateKey]) -> None:
    assert_invalid(package, [pkcs1(keys[0])], "not signed")


def test_a_file_changed_after_signing_is_refused(
    package: bytes, keys: list[rsa.RSAPrivateKey]
) -> None:
    signed = sign_package(package, _private_pem(keys[0]), signed_at=SIGNED_AT)
    tampered = rezip(signed, change="main.py")
    assert (
        zipfile.ZipFile(io.BytesIO(tampered)).comment == zipfile.ZipFile(io.BytesIO(signed)).comment
    )
    assert_invalid(tampered, [pkcs1(keys[0])], "matches none", "changed after signing")
    added = rezip(signed, extra={"extra.py": b"print('hi')\n"})
    assert_invalid(added, [pkcs1(keys[0])], "matches none")


def test_a_changed_time_is_refused(package: bytes, keys: list[rsa.RSAPrivateKey]) -> None:
    signed = sign_package(package, _private_pem(keys[0]), signed_at=SIGNED_AT)
    fields = json.loads(zipfile.ZipFile(io.BytesIO(signed)).comment)
    fields["time"] += 1
    assert_invalid(rezip(signed, comment=json.dumps(fields).encode()), [pkcs1(keys[0])])


def test_the_wrong_key_is_refused(package: bytes, keys: list[rsa.RSAPrivateKey]) -> None:
    signed = sign_package(package, _private_pem(keys[0]), signed_at=SIGNED_AT)
    assert_invalid(signed, [pkcs1(keys[1]), pkcs1(keys[2])], "none of the 2 trusted")


@pytest.mark.parametrize(
    ("comment", "words"),
    [
        (b"built by hand", ("not a Dify signature", "not JSON")),
        (b"\xff\xfe", ("not JSON",)),
        (b"[1, 2]", ("signature object",)),
        (b'{"time": 1}', ("no 'signature'",)),
        (b'{"signature": "", "time": 1}', ("no 'signature'",)),
        (b'{"signature": "AAAA"}', ("integer 'time'",)),
        (b'{"signature": "AAAA", "time": "1"}', ("integer 'time'",)),
        (b'{"signature": "AAAA", "time": 1.5}', ("integer 'time'",)),
        (b'{"signature": "AAAA", "time": true}', ("integer 'time'",)),
        (b'{"signature": "AAAA", "time": 9223372036854775808}', ("integer 'time'",)),
        (b'{"signature": "not base64!", "time": 1}', ("not valid base64",)),
        (b'{"signature": "AAAA", "time": 1}', ("matches none",)),
    ],
)
def test_a_bad_comment_is_refused_clearly(
    package: bytes, keys: list[rsa.RSAPrivateKey], comment: bytes, words: tuple[str, ...]
) -> None:
    assert_invalid(rezip(package, comment=comment), [pkcs1(keys[0])], *words)


def test_a_signed_verification_file_gives_the_category(
    package: bytes, keys: list[rsa.RSAPrivateKey]
) -> None:
    verified = rezip(package, extra={VERIFICATION_FILE: b'{"authorized_category":"partner"}'})
    signed = sign_package(verified, _private_pem(keys[0]), signed_at=SIGNED_AT)
    message, signature = independent_signed_data(signed)  # the file is hashed like any other
    keys[0].public_key().verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    assert verify_signature(signed, [pkcs1(keys[0])]).authorized_category == "partner"
    promoted = rezip(signed, change=VERIFICATION_FILE)  # '{' becomes 'z': not JSON any more
    assert_invalid(promoted, [pkcs1(keys[0])], VERIFICATION_FILE)


def test_a_bad_zip_is_not_a_signature_problem(keys: list[rsa.RSAPrivateKey]) -> None:
    with pytest.raises(PlugindError) as caught:
        verify_signature(b"not a zip", [pkcs1(keys[0])])
    assert caught.value.code == "invalid_package"
    with pytest.raises(PlugindError) as caught:
        sign_package(b"not a zip", _private_pem(keys[0]))
    assert caught.value.code == "invalid_package"


def test_trailing_bytes_after_the_zip_stop_signing(
    package: bytes, keys: list[rsa.RSAPrivateKey]
) -> None:
    with pytest.raises(PlugindError, match="bytes after its zip end record"):
        sign_package(package + b"junk", _private_pem(keys[0]))


def test_bad_keys_are_configuration_errors(package: bytes, keys: list[rsa.RSAPrivateKey]) -> None:
    with pytest.raises(ValueError, match="no public key"):
        verify_signature(package, [])
    with pytest.raises(ValueError, match="public key #1 is not a PEM public key"):
        verify_signature(package, [pkcs1(keys[0]), b"garbage"])
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_private = ec_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="not an RSA private key"):
        sign_package(package, ec_private)


def test_load_public_keys(tmp_path: Path, keys: list[rsa.RSAPrivateKey]) -> None:
    good = tmp_path / "good.pem"
    good.write_bytes(pkcs1(keys[0]))
    spki = tmp_path / "spki.pem"
    spki.write_bytes(_public_pem(keys[1], serialization.PublicFormat.SubjectPublicKeyInfo))
    assert load_public_keys([good, spki]) == [good.read_bytes(), spki.read_bytes()]

    private = tmp_path / "private.pem"
    private.write_bytes(_private_pem(keys[0]))
    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    huge = tmp_path / "huge.pem"
    huge.write_bytes(b"x" * (65 * 1024))
    for path, words in [
        (private, "is not a PEM public key"),
        (ec_pem, "is not an RSA key"),
        (huge, "is over"),
        (tmp_path / "missing.pem", "cannot be read"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_public_keys([good, path])
        assert str(path) in str(caught.value)
        assert words in str(caught.value)
