"""Finding a Python that can run plugins.

The daemon runs on 3.11, but the current ``dify-plugin`` SDK needs 3.12 or newer, so plugin
environments are built from another interpreter. An interpreter counts only if it really runs:
pyenv shims such as ``python3.12`` exist on PATH and exit 127 when that version is not
selected, and uv would fail later with a far less clear message.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

from plugind.errors import PlugindError

log = logging.getLogger(__name__)

MIN_VERSION = (3, 12)
PROBE_TIMEOUT = 15.0
_PROBE = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
_VERSION_DIR = re.compile(r"^3\.(\d+)")

_cache: dict[str | None, Path] = {}
_lock = threading.Lock()


def probe_version(python: Path) -> tuple[int, int, int] | None:
    """The version of ``python`` if it runs, else ``None``."""
    try:
        done = subprocess.run(
            [str(python), "-c", _PROBE],
            capture_output=True,
            timeout=PROBE_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    try:
        major, minor, micro = (int(p) for p in done.stdout.decode().strip().split("."))
    except ValueError:
        return None
    return major, minor, micro


def _candidates() -> list[Path]:
    """Interpreters worth probing, most specific first; duplicates removed."""
    found: list[Path] = []
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    versions = pyenv_root / "versions"
    if versions.is_dir():
        for folder in sorted(versions.iterdir(), reverse=True):
            match = _VERSION_DIR.match(folder.name)
            if match and int(match[1]) >= MIN_VERSION[1]:
                found.append(folder / "bin" / f"python3.{match[1]}")
    uv_pythons = Path(
        os.environ.get("UV_PYTHON_INSTALL_DIR") or Path.home() / ".local/share/uv/python"
    )
    if uv_pythons.is_dir():
        for folder in sorted(uv_pythons.iterdir(), reverse=True):
            for binary in sorted((folder / "bin").glob("python3.1[2-9]")):
                found.append(binary)
    for name in ("python3.14", "python3.13", "python3.12", "python3"):
        on_path = shutil.which(name)
        if on_path:
            found.append(Path(on_path))
    unique: list[Path] = []
    for path in found:
        if path not in unique and path.exists():
            unique.append(path)
    return unique


def _check_explicit(explicit: str) -> Path:
    path = Path(explicit).expanduser()
    if not path.is_absolute():
        resolved = shutil.which(explicit)
        if resolved is None:
            raise PlugindError(
                "plugin_start_failed",
                f"PLUGIN_PYTHON={explicit} is not a file or a command on PATH",
            )
        path = Path(resolved)
    if not path.exists():
        raise PlugindError("plugin_start_failed", f"PLUGIN_PYTHON={explicit} does not exist")
    version = probe_version(path)
    if version is None:
        raise PlugindError(
            "plugin_start_failed",
            f"PLUGIN_PYTHON={explicit} does not run (a pyenv shim of a version that is not "
            "installed?); give the full path of a Python >= 3.12",
        )
    if version[:2] < MIN_VERSION:
        raise PlugindError(
            "plugin_start_failed",
            f"PLUGIN_PYTHON={explicit} is Python {'.'.join(map(str, version))}; "
            "the dify-plugin SDK needs Python >= 3.12",
        )
    return path


def _discover() -> Path:
    best: tuple[tuple[int, int, int], Path] | None = None
    for path in _candidates():
        version = probe_version(path)
        if version is None or version[:2] < MIN_VERSION:
            continue
        if best is None or version > best[0]:
            best = (version, path)
    if best is None:
        raise PlugindError(
            "plugin_start_failed",
            "no Python >= 3.12 found (looked in pyenv, uv-managed Pythons and PATH); "
            "set PLUGIN_PYTHON to the full path of one",
        )
    log.info("Plugin Python: %s (%s)", best[1], ".".join(map(str, best[0])))
    return best[1]


def find_plugin_python(explicit: str | None) -> Path:
    """The interpreter for plugins: ``explicit`` (``PLUGIN_PYTHON``), else the newest found.

    Blocking (it runs the candidates once; the answer is cached): call it in a worker thread
    from async code. Raises ``plugin_start_failed`` with what to do when there is none.
    """
    key = explicit or None
    with _lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        path = _check_explicit(key) if key else _discover()
        _cache[key] = path
        return path


def clear_cache() -> None:
    """Forget found interpreters (tests, or after installing a new Python)."""
    with _lock:
        _cache.clear()
