"""Dify's shapes, as msgspec structs: the bodies dify-api sends and the ``data`` it parses.

Field names and required fields follow dify-api's pydantic models (``api/core/plugin/entities/
plugin.py``, ``plugin_daemon.py``) and its client calls (``api/core/plugin/impl/*.py``). Requests
ignore unknown fields (dify-api may send more); responses carry what dify-api requires, and the
tests decode every answer back into these structs, strictly, as a second check of the contract.
Times are RFC 3339 strings, which pydantic reads as datetimes.
"""

from __future__ import annotations

import builtins
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

Identifier = Annotated[str, Meta(min_length=1, max_length=512)]
Status = Literal["pending", "running", "success", "failed"]
Source = Literal["package", "marketplace", "github", "remote"]

# --- requests ---------------------------------------------------------------------------------


class DecodeRequest(Struct):
    plugin_unique_identifier: Identifier


class InstallIdentifiersRequest(Struct):
    plugin_unique_identifiers: Annotated[list[Identifier], Meta(min_length=1, max_length=64)]
    source: str
    # the console sends `[{}]` whatever the number of identifiers: a shorter list is padded
    metas: list[dict[str, Any] | None] | None = None


class UpgradeRequest(Struct):
    original_plugin_unique_identifier: Identifier
    new_plugin_unique_identifier: Identifier
    source: str
    meta: dict[str, Any] | None = None


class UninstallRequest(Struct):
    plugin_installation_id: Annotated[str, Meta(min_length=1, max_length=128)]


class FetchBatchRequest(Struct):
    plugin_ids: Annotated[list[str], Meta(max_length=256)]


class MissingRequest(Struct):
    plugin_unique_identifiers: Annotated[list[Identifier], Meta(max_length=256)]


class ProviderRef(Struct):
    plugin_id: str
    provider_name: str


class CheckExistenceRequest(Struct):
    provider_ids: Annotated[list[ProviderRef], Meta(max_length=256)]


# --- responses --------------------------------------------------------------------------------


class I18n(Struct):
    en_US: str
    zh_Hans: str | None = None
    ja_JP: str | None = None
    pt_BR: str | None = None


class Resource(Struct):
    memory: int
    permission: dict[str, Any] | None = None


class DeclarationMeta(Struct):
    version: str | None = None
    minimum_dify_version: str | None = None


class PluginDeclaration(Struct):
    """What dify-api requires of a ``PluginDeclaration`` (the rest passes through)."""

    version: str
    author: str
    name: str
    description: I18n
    icon: str
    label: I18n
    created_at: str
    resource: Resource
    plugins: dict[str, list[str] | None]
    meta: DeclarationMeta
    tags: list[str] = []
    verified: bool = False
    icon_dark: str | None = None
    tool: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    endpoint: dict[str, Any] | None = None
    agent_strategy: dict[str, Any] | None = None
    datasource: dict[str, Any] | None = None
    trigger: dict[str, Any] | None = None


class Verification(Struct):
    authorized_category: Literal["langgenius", "partner", "community"]


class DecodeResponse(Struct):
    unique_identifier: str
    manifest: dict[str, Any]
    verification: Verification | None


class InstallStartResponse(Struct):
    all_installed: bool
    task_id: str


class InstallTaskPlugin(Struct):
    plugin_unique_identifier: str
    plugin_id: str
    status: Status
    message: str
    icon: str
    labels: dict[str, Any]
    icon_dark: str = ""
    source: str = ""


class InstallTask(Struct):
    id: str
    created_at: str
    updated_at: str
    tenant_id: str
    status: Status
    total_plugins: int
    completed_plugins: int
    plugins: list[InstallTaskPlugin]


class PluginInstallation(Struct, kw_only=True):
    id: str
    created_at: str
    updated_at: str
    tenant_id: str
    endpoints_setups: int
    endpoints_active: int
    runtime_type: str
    source: str
    meta: dict[str, Any]
    plugin_id: str
    plugin_unique_identifier: str
    version: str
    checksum: str
    declaration: dict[str, Any]


class PluginEntity(PluginInstallation, kw_only=True):
    name: str
    installation_id: str


class PluginList(Struct):
    list: builtins.list[PluginEntity]  # `list` alone would name this very field
    total: int


class ProviderRow(Struct, kw_only=True):
    """A row of ``management/tools``, ``models``, ``datasources``, ``triggers``."""

    id: str
    created_at: str
    updated_at: str
    tenant_id: str
    provider: str
    plugin_unique_identifier: str
    plugin_id: str
    declaration: dict[str, Any]


class AgentStrategyRow(ProviderRow, kw_only=True):
    meta: dict[str, Any]


class DatasourceRow(ProviderRow, kw_only=True):
    is_authorized: bool = False


class MissingDependency(Struct):
    plugin_unique_identifier: str
    current_identifier: str | None


class Readme(Struct):
    content: str
    language: str


def to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)
