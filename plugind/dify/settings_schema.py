"""Endpoint settings against their declaration (a plugin's ``ProviderConfig`` list).

What the Go daemon does with an endpoint group's ``settings``: check the values Dify sends on
setup and update (required ones present, each of its declared type), and mask the secret
inputs wherever settings are shown or recorded (first and last two characters kept of values
longer than six, as upstream's ``MaskConfigCredentials``; Dify's console sends a masked value
back unchanged when the user did not touch the field, which is how an update keeps a secret).
"""

from __future__ import annotations

from typing import Any, Final

SECRET_INPUT: Final = "secret-input"
MAX_FIELDS: Final = 64


class SettingsError(ValueError):
    """Settings the declaration does not accept; the message names the field."""


def fields(declaration: Any) -> list[dict[str, Any]]:
    """The ``ProviderConfig`` entries of an endpoint group (``declaration["endpoint"]``)."""
    group = declaration.get("endpoint") if isinstance(declaration, dict) else None
    settings = group.get("settings") if isinstance(group, dict) else None
    if not isinstance(settings, list):
        return []
    return [f for f in settings if isinstance(f, dict) and isinstance(f.get("name"), str)]


def secret_names(schema: list[dict[str, Any]]) -> set[str]:
    return {f["name"] for f in schema if f.get("type") == SECRET_INPUT}


def validate(settings: dict[str, Any], schema: list[dict[str, Any]]) -> None:
    """Raise :class:`SettingsError` unless ``settings`` satisfy ``schema`` (upstream's rules)."""
    if len(settings) > MAX_FIELDS:
        raise SettingsError("too many setting fields")
    for field in schema:
        name = field["name"]
        value = settings.get(name)
        if value is None:
            if field.get("required"):
                raise SettingsError(f"missing required setting: {name}")
            continue
        kind = field.get("type")
        if kind in ("text-input", SECRET_INPUT) and not isinstance(value, str):
            raise SettingsError(f"setting {name} is not a string")
        if kind == "select":
            options = [o.get("value") for o in field.get("options") or [] if isinstance(o, dict)]
            if not isinstance(value, str):
                raise SettingsError(f"setting {name} is not a string")
            if value not in options:
                raise SettingsError(f"setting {name} is not a valid option")
        if kind == "boolean" and not isinstance(value, bool):
            raise SettingsError(f"setting {name} is not a boolean")
        if kind == "app-selector":
            if not isinstance(value, dict):
                raise SettingsError(f"setting {name} is not a map")
            if "app_id" not in value:
                raise SettingsError(f"setting {name} is missing app_id")
        if kind == "model-selector":
            if not isinstance(value, dict):
                raise SettingsError(f"setting {name} is not a map")
            for key in ("provider", "model", "model_type"):
                if key not in value:
                    raise SettingsError(f"setting {name} is missing {key}")


def mask_value(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if len(value) > 6:
        return value[:2] + "*" * (len(value) - 4) + value[-2:]
    return "*" * len(value)


def masked(settings: dict[str, Any], secrets: set[str]) -> dict[str, Any]:
    """``settings`` with every secret input masked."""
    return {k: mask_value(v) if k in secrets else v for k, v in settings.items()}


def split(settings: dict[str, Any], secrets: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(the plain settings, the secret ones)``."""
    plain = {k: v for k, v in settings.items() if k not in secrets}
    secret = {k: v for k, v in settings.items() if k in secrets and v is not None}
    return plain, secret
