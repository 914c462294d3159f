"""The environment handed to code we do not control: plugin processes and uv.

The daemon's own environment holds its secrets (``REDIS_URL``, ``DATABASE_URL``,
``PLUGIND_API_KEY``, ``DIFY_INNER_API_KEY``...). A plugin is third-party code, and so is any
``setup.py`` that uv builds, so both get an allow-list of harmless variables instead of a
copy of ours: a deny-list would leak the next secret somebody adds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# What a Python program needs to find executables, write temp files and decode text.
_SAFE_NAMES = frozenset({"PATH", "HOME", "LANG", "TZ", "TMPDIR"})
_SAFE_PREFIXES = ("LC_",)

# uv also needs its own settings (cache, index mirrors) and the network ones set by operators.
_UV_NAMES = frozenset(
    {
        "XDG_CACHE_HOME",
        "XDG_DATA_HOME",
        "XDG_CONFIG_HOME",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "PIP_INDEX_URL",
        "PIP_EXTRA_INDEX_URL",
    }
)
_UV_PREFIXES = ("UV_",)


def _pick(
    source: Mapping[str, str], names: frozenset[str], prefixes: tuple[str, ...]
) -> dict[str, str]:
    return {k: v for k, v in source.items() if k in names or k.startswith(prefixes)}


def plugin_env(
    extra: Mapping[str, str] | None = None, *, source: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a plugin process: safe variables, ``INSTALL_METHOD=local``, ``extra``.

    ``PYTHONUNBUFFERED`` makes a plugin's own ``print`` to stderr reach our tail at once, so a
    crash message is not lost in a buffer when the process dies.
    """
    env = _pick(os.environ if source is None else source, _SAFE_NAMES, _SAFE_PREFIXES)
    env["INSTALL_METHOD"] = "local"
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def uv_env(*, source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a uv run: safe variables plus uv, proxy and certificate settings."""
    src = os.environ if source is None else source
    env = _pick(src, _SAFE_NAMES, _SAFE_PREFIXES)
    env.update(_pick(src, _UV_NAMES, _UV_PREFIXES))
    env["NO_COLOR"] = "1"
    env.pop("VIRTUAL_ENV", None)
    return env
