"""``manifest.yaml``: its schema, and Dify's plugin declaration built from it.

The checks are the ones Dify's daemon applies when it decodes a package (required fields,
author/name/version patterns, a Python runner, at least one provider, model plugins alone), so a
package we accept is one Dify would accept too. Every message names the field that is wrong,
because the person reading it is fixing a YAML file.

The declaration is what Dify's API stores and shows for a plugin: the manifest with each
provider YAML it lists expanded in place under ``tool``/``model``/``endpoint``/``agent_strategy``/
``datasource``/``trigger``, and each provider's tool (strategy, endpoint...) files expanded in
turn.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import re
from collections.abc import Collection
from typing import Any, Protocol

import yaml

from plugind.errors import PlugindError

AUTHOR_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
NAME_RE = re.compile(r"^[a-z0-9_-]{1,128}$")
VERSION_RE = re.compile(r"^\d{1,4}(\.\d{1,4}){2}(-\w{1,16})?$", re.ASCII)
ENTRYPOINT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
ARCHES = ("amd64", "arm64")
MAX_YAML_NODES = 200_000  # YAML aliases can make a small file expand exponentially

# manifest `plugins` key -> (declaration key, the provider YAML's list of detail files)
PROVIDER_KINDS: dict[str, tuple[str, str]] = {
    "tools": ("tool", "tools"),
    "endpoints": ("endpoint", "endpoints"),
    "agent_strategies": ("agent_strategy", "strategies"),
    "datasources": ("datasource", "datasources"),
    "triggers": ("trigger", "events"),
    "models": ("model", "models"),
}
_CREDENTIAL_KINDS = ("tools", "datasources")

try:
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader


class YamlSource(Protocol):
    """The package's files, as far as building the declaration needs them."""

    @property
    def files(self) -> Collection[str]: ...

    def load(self, path: str, purpose: str) -> Any:
        """The parsed YAML at ``path``; ``purpose`` says why, for the error if it is missing."""
        ...


def parse_yaml(raw: bytes, path: str) -> Any:
    """Parse one YAML file of the package into JSON-compatible values."""
    try:
        value = yaml.load(raw, Loader=_Loader)  # a SafeLoader: no Python objects from YAML
    except yaml.YAMLError as exc:
        raise PlugindError("invalid_package", f"{path} is not valid YAML: {exc}") from None
    budget = [MAX_YAML_NODES]
    return _jsonable(value, path, budget)


def _jsonable(value: Any, path: str, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise PlugindError("invalid_package", f"{path} expands to too many values (YAML aliases?)")
    if isinstance(value, dict):
        return {str(k): _jsonable(v, path, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v, path, budget) for v in value]
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None and value.utcoffset() == dt.timedelta(0):
            return value.replace(tzinfo=None).isoformat() + "Z"
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise PlugindError("invalid_package", f"{path} holds an unsupported YAML value {value!r}")


def _fail(field: str, problem: str) -> PlugindError:
    return PlugindError("invalid_package", f"manifest.yaml: `{field}` {problem}")


def _mapping(container: dict[str, Any], key: str, field: str) -> dict[str, Any]:
    value = container.get(key)
    if not isinstance(value, dict):
        raise _fail(field, "is required and must be a mapping")
    return value


def _text(
    container: dict[str, Any], key: str, field: str, pattern: re.Pattern[str] | None = None
) -> str:
    value = container.get(key)
    if not isinstance(value, str) or not value:
        raise _fail(field, f"is required and must be a non-empty string, got {value!r}")
    if pattern is not None and not pattern.match(value):
        raise _fail(field, f"must match {pattern.pattern}, got {value!r}")
    return value


def _i18n(container: dict[str, Any], key: str) -> None:
    value = _mapping(container, key, key)
    if not isinstance(value.get("en_US"), str) or not value["en_US"]:
        raise _fail(f"{key}.en_US", "is required (an English text)")


def validate_manifest(manifest: Any, files: set[str]) -> dict[str, Any]:
    """Check a parsed manifest against Dify's rules; ``files`` are the package's file paths."""
    if not isinstance(manifest, dict):
        raise PlugindError("invalid_package", "manifest.yaml must be a YAML mapping")
    if manifest.get("type") != "plugin":
        raise _fail("type", f"must be 'plugin', got {manifest.get('type')!r}")
    _text(manifest, "version", "version", VERSION_RE)
    _text(manifest, "author", "author", AUTHOR_RE)
    _text(manifest, "name", "name", NAME_RE)
    _i18n(manifest, "label")
    _i18n(manifest, "description")
    icon = _text(manifest, "icon", "icon")
    if f"_assets/{icon}" not in files:
        raise _fail("icon", f"names _assets/{icon}, which is not in the package")
    icon_dark = manifest.get("icon_dark")
    if icon_dark and f"_assets/{icon_dark}" not in files:
        raise _fail("icon_dark", f"names _assets/{icon_dark}, which is not in the package")
    if manifest.get("created_at") in (None, ""):
        raise _fail("created_at", "is required (an RFC 3339 time)")
    resource = _mapping(manifest, "resource", "resource")
    if not isinstance(resource.get("memory"), int) or isinstance(resource.get("memory"), bool):
        raise _fail("resource.memory", "is required and must be a number of bytes")

    meta = _mapping(manifest, "meta", "meta")
    _text(meta, "version", "meta.version")
    arch = meta.get("arch")
    if not isinstance(arch, list) or not arch or any(a not in ARCHES for a in arch):
        raise _fail("meta.arch", f"must be a non-empty list of {', '.join(ARCHES)}, got {arch!r}")
    runner = _mapping(meta, "runner", "meta.runner")
    if runner.get("language") != "python":
        raise _fail("meta.runner.language", f"must be 'python', got {runner.get('language')!r}")
    if isinstance(runner.get("version"), int | float) and not isinstance(runner["version"], bool):
        runner["version"] = str(runner["version"])  # an unquoted `version: 3.12`, as Go reads it
    _text(runner, "version", "meta.runner.version")
    entrypoint = _text(runner, "entrypoint", "meta.runner.entrypoint", ENTRYPOINT_RE)
    module = entrypoint.replace(".", "/")
    if f"{module}.py" not in files and f"{module}/__main__.py" not in files:
        raise _fail(
            "meta.runner.entrypoint", f"is {entrypoint!r} but {module}.py is not in the package"
        )

    plugins = _mapping(manifest, "plugins", "plugins")
    present: list[str] = []
    for key, value in plugins.items():
        if key not in PROVIDER_KINDS:
            continue
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise _fail(f"plugins.{key}", "must be a list of file paths")
        for index, path in enumerate(value):
            if path not in files:
                raise _fail(f"plugins.{key}[{index}]", f"names {path}, which is not in the package")
        if value:
            present.append(key)
    if not present:
        raise _fail(
            "plugins", f"must list at least one provider file ({', '.join(PROVIDER_KINDS)})"
        )
    if "models" in present and len(present) > 1:
        raise _fail("plugins", "a model plugin cannot also provide tools, endpoints or others")
    return manifest


def build_declaration(
    manifest: dict[str, Any], source: YamlSource
) -> tuple[dict[str, Any], list[str]]:
    """Dify's plugin declaration and the ``provider/tool`` names of its tools."""
    declaration = copy.deepcopy(manifest)
    declaration["verified"] = False
    if not isinstance(declaration.get("tags"), list):
        declaration["tags"] = []
    tool_names: list[str] = []
    for key, (target, files_key) in PROVIDER_KINDS.items():
        for path in manifest["plugins"].get(key) or []:
            provider = _provider(source, path, needs_identity=key != "endpoints")
            if key in _CREDENTIAL_KINDS:
                _normalise_credentials(provider)
            if key == "models":
                _expand_models(provider, path, source)
            else:
                provider[files_key] = _expand_list(provider.get(files_key), path, files_key, source)
            if key == "tools":
                provider_name = provider["identity"].get("name", "")
                for tool in provider[files_key]:
                    identity = tool.get("identity") if isinstance(tool, dict) else None
                    if not isinstance(identity, dict) or not identity.get("name"):
                        raise PlugindError(
                            "invalid_package", f"a tool of {path} has no identity.name"
                        )
                    tool_names.append(f"{provider_name}/{identity['name']}")
            declaration[target] = provider  # Dify keeps one provider per kind: the last listed
    _fill_defaults(declaration)
    return declaration, tool_names


def _provider(source: YamlSource, path: str, *, needs_identity: bool = True) -> dict[str, Any]:
    """A provider YAML; an endpoint group has no identity (just settings and endpoints)."""
    provider = source.load(path, "provider")
    if not isinstance(provider, dict):
        raise PlugindError("invalid_package", f"{path} must be a YAML mapping")
    identity = provider.get("identity")
    if needs_identity and "provider" not in provider and not isinstance(identity, dict):
        raise PlugindError("invalid_package", f"{path} has no `identity` mapping")
    return provider


def _expand_list(items: Any, path: str, files_key: str, source: YamlSource) -> list[Any]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise PlugindError("invalid_package", f"{path}: `{files_key}` must be a list")
    expanded: list[Any] = []
    for item in items:
        if isinstance(item, str):
            detail = source.load(item, f"listed in {path}")
            if not isinstance(detail, dict):
                raise PlugindError("invalid_package", f"{item} must be a YAML mapping")
            expanded.append(detail)
        elif isinstance(item, dict):
            expanded.append(item)
        else:
            raise PlugindError("invalid_package", f"{path}: `{files_key}` holds {item!r}")
    return expanded


def _normalise_credentials(provider: dict[str, Any]) -> None:
    """Dify accepts credentials as a list or as a name -> field mapping; it stores a list."""
    schema = provider.get("credentials_schema")
    if not schema:
        schema = provider.pop("credentials_for_provider", None) or []
    else:
        provider.pop("credentials_for_provider", None)
    if isinstance(schema, dict):
        schema = [
            {**field, "name": name} for name, field in schema.items() if isinstance(field, dict)
        ]
    provider["credentials_schema"] = schema if isinstance(schema, list) else []


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Go's ``filepath.Match``: ``*`` and ``?`` never cross a ``/``."""
    out: list[str] = []
    for char in pattern:
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(char))
    return re.compile("^" + "".join(out) + "$")


def _expand_models(provider: dict[str, Any], path: str, source: YamlSource) -> None:
    """Model providers list models per type: ``{llm: {predefined: [globs], position: file}}``."""
    models = provider.get("models")
    if isinstance(models, list) or models is None:
        provider["models"] = _expand_list(models, path, "models", source)
        return
    if not isinstance(models, dict):
        raise PlugindError("invalid_package", f"{path}: `models` must be a mapping or a list")
    expanded: list[Any] = []
    positions: dict[str, Any] = {}
    for model_type, spec in models.items():
        if not isinstance(spec, dict):
            continue
        position = spec.get("position")
        if isinstance(position, str):
            positions[model_type] = source.load(position, f"position file of {path}")
        patterns = [_glob_regex(p) for p in spec.get("predefined") or [] if isinstance(p, str)]
        for file in sorted(source.files):
            if file.endswith("_position.yaml"):
                continue
            if any(p.match(file) for p in patterns):
                expanded.append(source.load(file, f"model of {path}"))
    provider["models"] = expanded
    if positions:
        provider["position"] = positions


def _fill_defaults(declaration: dict[str, Any]) -> None:
    """Dify's ``FillInDefaultValues``: providers inherit the plugin's description and tags."""
    for key in ("tool", "trigger"):
        provider = declaration.get(key)
        if isinstance(provider, dict) and isinstance(provider.get("identity"), dict):
            identity = provider["identity"]
            description = identity.get("description")
            if not isinstance(description, dict) or not description.get("en_US"):
                identity["description"] = copy.deepcopy(declaration["description"])
            if not identity.get("tags"):
                identity["tags"] = list(declaration["tags"])
    model = declaration.get("model")
    if isinstance(model, dict) and model.get("description") is None:
        model["description"] = copy.deepcopy(declaration["description"])
