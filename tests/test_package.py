"""Packages: checksum, identifier, verification, declaration, extraction, building."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from pathlib import Path

import pytest
from plugin_factory import ECHO, package_bytes, write_plugin

from plugind.errors import PlugindError
from plugind.package.difypkg import (
    PluginPackage,
    build_package,
    dify_checksum,
    install_dir,
    parse_identifier,
    read_package,
)
from plugind.package.extract import MARKER, extract

CALC = Path(__file__).resolve().parent.parent / "examples" / "plugins" / "calc"
MiB = 1024 * 1024


def independent_checksum(data: bytes) -> str:
    """Dify's checksum recomputed from the zip entries, without plugind's code."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        files = sorted(
            (info.filename.encode(), zf.read(info)) for info in zf.infolist() if not info.is_dir()
        )
    joined = b"".join(hashlib.sha256(p).digest() + hashlib.sha256(c).digest() for p, c in files)
    return hashlib.sha256(joined).hexdigest()


def zip_of(files: dict[str, bytes | str], *, symlinks: tuple[str, ...] = ()) -> bytes:
    """A zip of ``files`` exactly as given (no checks), for hostile packages."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            mode = stat.S_IFLNK | 0o777 if name in symlinks else stat.S_IFREG | 0o644
            info.external_attr = mode << 16
            zf.writestr(info, content)
    return buffer.getvalue()


def plugin_files(folder: Path) -> dict[str, bytes | str]:
    with zipfile.ZipFile(io.BytesIO(package_bytes(folder))) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def text_of(files: dict[str, bytes | str], name: str) -> str:
    value = files[name]
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture
def calc_data() -> bytes:
    return build_package(CALC)


@pytest.fixture
def good_files(tmp_path: Path) -> dict[str, bytes | str]:
    return plugin_files(write_plugin(tmp_path / "p", tools={"echo": ECHO}))


def rejects(data: bytes, code: str, *words: str, max_size: int = 50 * MiB) -> PlugindError:
    with pytest.raises(PlugindError) as caught:
        read_package(data, max_size=max_size)
    assert caught.value.code == code, caught.value.message
    for word in words:
        assert word in caught.value.message
    return caught.value


# ------------------------------------------------------------------ checksum and identity


def test_checksum_is_difys(calc_data: bytes) -> None:
    package = read_package(calc_data, max_size=50 * MiB)
    assert package.checksum == independent_checksum(calc_data)
    assert dify_checksum(calc_data) == package.checksum
    assert package.sha256 == hashlib.sha256(calc_data).hexdigest()


def test_checksum_ignores_zip_metadata_but_not_content(good_files: dict[str, bytes | str]) -> None:
    plain = zip_of(good_files)
    reordered = zip_of(dict(reversed(list(good_files.items()))))
    assert plain != reordered
    assert dify_checksum(plain) == dify_checksum(reordered) == independent_checksum(plain)
    changed = dict(good_files, **{"main.py": b"# changed\n"})
    assert dify_checksum(zip_of(changed)) != dify_checksum(plain)


def test_identifier_and_install_dir(calc_data: bytes, tmp_path: Path) -> None:
    package = read_package(calc_data, max_size=50 * MiB)
    assert package.plugin_id == "acme/calc"
    assert package.identifier == f"acme/calc:0.1.0@{package.checksum}"
    assert len(package.checksum) == 64
    assert parse_identifier(package.identifier) == ("acme", "calc", "0.1.0", package.checksum)
    assert install_dir(tmp_path, package.identifier) == (
        tmp_path / "acme" / f"calc-0.1.0@{package.checksum}"
    )
    assert package.entrypoint == "main"


@pytest.mark.parametrize(
    "bad",
    [
        "acme/calc",
        "acme/calc:0.1.0",
        "calc:0.1.0@" + "a" * 64,
        "Acme/calc:0.1.0@" + "a" * 64,
        "acme/calc:one@" + "a" * 64,
        "acme/calc:0.1.0@" + "g" * 64,
        "../x/calc:0.1.0@" + "a" * 64,
    ],
)
def test_parse_identifier_rejects_malformed(bad: str) -> None:
    with pytest.raises(PlugindError) as caught:
        parse_identifier(bad)
    assert caught.value.code == "unknown_plugin"
    assert "author/name:version@checksum" in caught.value.message


def test_summary_and_declaration(calc_data: bytes) -> None:
    package = read_package(calc_data, max_size=50 * MiB)
    summary = package.summary()
    assert summary.tools == ["calc/add", "calc/multiply", "calc/divide"]
    assert summary.author == "acme"
    assert summary.runner == {"language": "python", "version": "3.12", "entrypoint": "main"}
    assert summary.label["en_US"] == "Calculator"
    declaration = package.declaration
    assert declaration["name"] == "calc" and declaration["verified"] is False
    tool = declaration["tool"]
    assert tool["identity"]["name"] == "calc"
    assert [t["identity"]["name"] for t in tool["tools"]] == ["add", "multiply", "divide"]
    assert tool["tools"][0]["parameters"][0]["name"] == "a"
    assert tool["credentials_schema"] == []
    assert declaration["created_at"] == "2025-01-01T00:00:00Z"


# ------------------------------------------------------------------ rejections


def test_rejects_oversized(calc_data: bytes) -> None:
    rejects(calc_data, "package_too_large", str(len(calc_data)), max_size=len(calc_data) - 1)
    read_package(calc_data, max_size=len(calc_data))


def test_rejects_not_a_zip() -> None:
    rejects(b"this is not a zip file at all", "invalid_package", "not a valid zip")


def test_rejects_missing_manifest(good_files: dict[str, bytes | str]) -> None:
    del good_files["manifest.yaml"]
    rejects(zip_of(good_files), "invalid_package", "no manifest.yaml")


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("author: acme", "author: Acme!", "`author`"),
        ("name: tester", "name: Tester Plugin", "`name`"),
        ("version: 0.1.0", "version: one", "`version`"),
        ("type: plugin", "type: bundle", "`type`"),
        ("entrypoint: main", "entrypoint: -c", "`meta.runner.entrypoint`"),
        ("entrypoint: main", "entrypoint: missing", "`meta.runner.entrypoint`"),
        ("language: python", "language: go", "`meta.runner.language`"),
        ("icon: icon.svg", "icon: nope.svg", "`icon`"),
        ("icon: icon.svg", "icon: icon.svg\nicon_dark: dark.svg", "`icon_dark`"),
        ("memory: 268435456", "memory: lots", "`resource.memory`"),
        ("arch: [amd64, arm64]", "arch: [riscv]", "`meta.arch`"),
        ("    - provider/tester.yaml", "    - provider/missing.yaml", "`plugins.tools[0]`"),
        ("  tools:\n    - provider/tester.yaml\n", "  tools: []\n", "`plugins`"),
    ],
)
def test_rejects_bad_manifest_fields(
    good_files: dict[str, bytes | str], old: str, new: str, field: str
) -> None:
    manifest = text_of(good_files, "manifest.yaml")
    assert old in manifest
    good_files["manifest.yaml"] = manifest.replace(old, new)
    rejects(zip_of(good_files), "invalid_package", "manifest.yaml", field)


def test_accepts_what_dify_accepts(good_files: dict[str, bytes | str]) -> None:
    text = text_of(good_files, "manifest.yaml")
    good_files["manifest.yaml"] = text.replace('version: "3.12"', "version: 3.12")
    assert good_files["manifest.yaml"] != text
    package = read_package(zip_of(good_files), max_size=50 * MiB)
    assert package.summary().runner["version"] == "3.12"


def test_rejects_manifest_that_is_not_yaml(good_files: dict[str, bytes | str]) -> None:
    good_files["manifest.yaml"] = "version: [unclosed\n"
    rejects(zip_of(good_files), "invalid_package", "not valid YAML")


def test_rejects_broken_tool_yaml(good_files: dict[str, bytes | str]) -> None:
    good_files["tools/echo.yaml"] = "identity: {name: [\n"
    rejects(zip_of(good_files), "invalid_package", "tools/echo.yaml")
    del good_files["tools/echo.yaml"]
    rejects(zip_of(good_files), "invalid_package", "tools/echo.yaml", "not in the package")


@pytest.mark.parametrize(
    "name", ["../x", "tools/../../x", "/etc/cron.d/x", "C:/x", "a\\b", "a//b", "./x"]
)
def test_rejects_unsafe_paths(good_files: dict[str, bytes | str], name: str) -> None:
    good_files[name] = b"payload"
    rejects(zip_of(good_files), "unsafe_package", repr(name))


def test_rejects_symlink_entry(good_files: dict[str, bytes | str]) -> None:
    good_files["link"] = b"/etc/passwd"
    rejects(zip_of(good_files, symlinks=("link",)), "unsafe_package", "symbolic link")


def test_rejects_duplicate_entries(good_files: dict[str, bytes | str]) -> None:
    data = zip_of(good_files)
    buffer = io.BytesIO(data)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(buffer, "a") as zf:
        zf.writestr("main.py", b"print('other')\n")
    rejects(buffer.getvalue(), "unsafe_package", "more than once")


def test_rejects_zip_bombs(good_files: dict[str, bytes | str]) -> None:
    bomb = dict(good_files, **{"bomb.bin": b"\0" * (40 * MiB)})
    data = zip_of(bomb)
    assert len(data) < MiB
    # Over the inflated-size cap (8 × max_size by default)...
    rejects(data, "unsafe_package", "inflates to more than", max_size=2 * MiB)
    # ...and, under a generous cap, still refused for its compression ratio.
    with pytest.raises(PlugindError) as caught:
        read_package(data, max_size=2 * MiB, max_uncompressed=10**9)
    assert caught.value.code == "unsafe_package" and "zip bomb" in caught.value.message


def test_rejects_too_many_entries(good_files: dict[str, bytes | str]) -> None:
    many = dict(good_files, **{f"data/{i}.txt": b"x" for i in range(50)})
    with pytest.raises(PlugindError) as caught:
        read_package(zip_of(many), max_size=50 * MiB, max_entries=40)
    assert caught.value.code == "unsafe_package" and "entries" in caught.value.message


# ------------------------------------------------------------------ extraction


def test_extract_stays_inside_dest_and_is_idempotent(calc_data: bytes, tmp_path: Path) -> None:
    package = read_package(calc_data, max_size=50 * MiB)
    dest = install_dir(tmp_path / "plugins", package.identifier)
    extract(package, dest)
    written = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    with zipfile.ZipFile(io.BytesIO(calc_data)) as zf:
        assert written == sorted([*zf.namelist(), MARKER])
    outside = [
        p
        for p in (tmp_path / "plugins").rglob("*")
        if p.is_file() and not p.resolve().is_relative_to(dest.resolve())
    ]
    assert outside == []
    assert (dest / "tools" / "add.py").read_bytes() == (CALC / "tools" / "add.py").read_bytes()
    # A second extraction keeps what is there (a built .venv, for one).
    (dest / ".venv").mkdir()
    extract(package, dest)
    assert (dest / ".venv").is_dir()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_extract_replaces_a_half_written_folder(calc_data: bytes, tmp_path: Path) -> None:
    package = read_package(calc_data, max_size=50 * MiB)
    dest = tmp_path / "calc"
    dest.mkdir()
    (dest / "manifest.yaml").write_text("half")
    extract(package, dest)
    assert (dest / MARKER).read_text() == package.checksum
    assert (dest / "manifest.yaml").read_bytes() == (CALC / "manifest.yaml").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calc"]


def test_extract_refuses_hostile_entries_even_unverified(
    good_files: dict[str, bytes | str], tmp_path: Path
) -> None:
    """extract() re-checks entries: a PluginPackage built by hand cannot write outside dest."""
    good_files["../../escaped.txt"] = b"gotcha"
    data = zip_of(good_files)
    package = PluginPackage(
        data=data,
        sha256="0",
        checksum="0" * 64,
        author="acme",
        name="tester",
        version="0.1.0",
        manifest={},
        declaration={},
    )
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(PlugindError) as caught:
        extract(package, dest)
    assert caught.value.code == "unsafe_package"
    assert not dest.exists()
    assert not list(tmp_path.rglob("escaped.txt"))
    assert [p.name for p in dest.parent.iterdir()] == []  # no temporary folder left


# ------------------------------------------------------------------ building


def test_build_package_is_deterministic(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path / "p")
    first = build_package(folder)
    os.utime(folder / "main.py", (1_000_000, 1_000_000))
    (folder / "tools" / "echo.py").touch()
    assert build_package(folder) == first
    (folder / "main.py").write_text((folder / "main.py").read_text() + "\n")
    assert build_package(folder) != first


def test_build_package_skips_environments_and_honours_difyignore(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path / "p", tools={"echo": ECHO})
    for junk in (
        ".venv/bin/python",
        "__pycache__/main.cpython-312.pyc",
        ".git/HEAD",
        "tools/echo.pyc",
        "old.difypkg",
        "notes/secret.txt",
        "scratch.log",
    ):
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        (folder / junk).write_text("junk")
    (folder / ".difyignore").write_text("notes/\n*.log\n")
    with zipfile.ZipFile(io.BytesIO(build_package(folder))) as zf:
        names = set(zf.namelist())
    assert names == set(plugin_files(write_plugin(tmp_path / "q", tools={"echo": ECHO}))) | {
        ".difyignore"
    }
    (folder / ".difyignore").unlink()
    (folder / ".gitignore").write_text("scratch.log\n")  # Dify falls back to .gitignore
    with zipfile.ZipFile(io.BytesIO(build_package(folder))) as zf:
        names = set(zf.namelist())
    assert "notes/secret.txt" in names and "scratch.log" not in names


def test_build_package_requires_a_manifest(tmp_path: Path) -> None:
    with pytest.raises(PlugindError) as caught:
        build_package(tmp_path)
    assert caught.value.code == "invalid_package"
