"""A stored package's declaration as Dify's API reads it.

The package store keeps Dify's full plugin declaration (every provider YAML expanded in place).
Dify shows icons by asking the daemon for ``asset/{id}``, so, as upstream does, every icon a
declaration names (the plugin's, each provider's, a model provider's per-language ``icon_small``
/``icon_large``, a datasource's) is replaced by an asset id. Here the id is derived, not stored:
:func:`asset_id` names the package (its sha256) and the file, and keeps the extension, from
which dify-api guesses the MIME type. So any package in the store can serve its icons, however
it got there.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable
from typing import Any, Final

ASSETS_DIR: Final = "_assets/"
_PATH_HASH_LEN: Final = 16
_EXT_RE: Final = re.compile(r"\.[A-Za-z0-9]{1,8}$")
ASSET_ID_RE: Final = re.compile(r"^([0-9a-f]{64})([0-9a-f]{16})(\.[A-Za-z0-9]{1,8})?$")

# Dify's category, from which provider key a declaration holds (dify-api's own order).
CATEGORY_KEYS: Final = (
    ("tool", "tool"),
    ("model", "model"),
    ("datasource", "datasource"),
    ("agent_strategy", "agent-strategy"),
    ("trigger", "trigger"),
)

# the declaration keys of the provider kinds Dify lists: key -> the list of its items
PROVIDER_LISTS: Final = {
    "tool": "tools",
    "agent_strategy": "strategies",
    "datasource": "datasources",
    "trigger": "events",
    "model": "models",
}

_LANGUAGES: Final = ("en_US", "zh_Hans", "ja_JP", "pt_BR")


def path_hash(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:_PATH_HASH_LEN]


def asset_id(package_sha256: str, name: str) -> str:
    """The asset id of ``_assets/<name>`` in the package with this sha256.

    Unique across packages, stable, and ending in the file's extension.
    """
    path = ASSETS_DIR + name.lstrip("/")
    match = _EXT_RE.search(name)
    return f"{package_sha256}{path_hash(path)}{match.group(0) if match else ''}"


def parse_asset_id(value: str) -> tuple[str, str] | None:
    """``(package sha256, path hash)`` of an asset id, or None if it is not one."""
    match = ASSET_ID_RE.match(value)
    return (match[1], match[2]) if match else None


def category(declaration: dict[str, Any]) -> str:
    for key, name in CATEGORY_KEYS:
        if declaration.get(key):
            return name
    return "extension"


def for_dify(
    declaration: dict[str, Any], package_sha256: str, *, verified: bool | None = None
) -> dict[str, Any]:
    """A copy of ``declaration`` with every icon replaced by its asset id."""
    out = copy.deepcopy(declaration)

    def remap(value: Any) -> Any:
        if (
            isinstance(value, str)
            and value
            and "://" not in value
            and not value.startswith("data:")
        ):
            return asset_id(package_sha256, value)
        return value

    _remap_keys(out, ("icon", "icon_dark"), remap)
    for key in ("tool", "agent_strategy", "datasource", "trigger"):
        provider = out.get(key)
        if isinstance(provider, dict) and isinstance(provider.get("identity"), dict):
            _remap_keys(provider["identity"], ("icon", "icon_dark"), remap)
    datasource = out.get("datasource")
    if isinstance(datasource, dict):
        for item in datasource.get("datasources") or []:
            if isinstance(item, dict) and isinstance(item.get("identity"), dict):
                _remap_keys(item["identity"], ("icon",), remap)
    model = out.get("model")
    if isinstance(model, dict):
        for key in ("icon_small", "icon_large", "icon_small_dark", "icon_large_dark"):
            icons = model.get(key)
            if isinstance(icons, dict):
                for language in _LANGUAGES:
                    if language in icons:
                        icons[language] = remap(icons[language])
    if verified is not None:
        out["verified"] = verified
    return out


def _remap_keys(
    container: dict[str, Any], keys: tuple[str, ...], remap: Callable[[Any], Any]
) -> None:
    for key in keys:
        if container.get(key):
            container[key] = remap(container[key])


def provider_name(declaration: dict[str, Any], kind: str) -> str | None:
    """The bare provider name of a declaration's provider of ``kind`` (None if it has none)."""
    provider = declaration.get(kind)
    if not isinstance(provider, dict):
        return None
    if kind == "model":
        name = provider.get("provider")
    else:
        identity = provider.get("identity")
        name = identity.get("name") if isinstance(identity, dict) else None
    return name if isinstance(name, str) and name else None
