"""Every dispatch route of Dify's plugin daemon and the access type and action it becomes.

``/plugin/{tenant}/dispatch/<route>`` is a task command whose ``access`` and ``action`` are the
request ``type`` and ``action`` the plugin SDK routes on (``dify_plugin/core/entities/plugin/
request.py``: ``PluginInvokeType``, ``*Actions``; the upstream daemon's ``access_types``). The
body's ``data`` goes to the plugin unchanged, so no route needs code of its own: a new upstream
route is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class DispatchRoute:
    path: str  # under /plugin/{tenant}/dispatch/
    access: str  # the SDK's PluginInvokeType
    action: str  # the SDK's action name


def _routes(access: str, *pairs: tuple[str, str]) -> tuple[DispatchRoute, ...]:
    return tuple(DispatchRoute(path, access, action) for path, action in pairs)


ROUTES: Final[tuple[DispatchRoute, ...]] = (
    *_routes(
        "tool",
        ("tool/invoke", "invoke_tool"),
        ("tool/validate_credentials", "validate_tool_credentials"),
        ("tool/get_runtime_parameters", "get_tool_runtime_parameters"),
    ),
    *_routes(
        "model",
        ("llm/invoke", "invoke_llm"),
        ("llm/num_tokens", "get_llm_num_tokens"),
        ("text_embedding/invoke", "invoke_text_embedding"),
        ("text_embedding/num_tokens", "get_text_embedding_num_tokens"),
        ("multimodal_embedding/invoke", "invoke_multimodal_embedding"),
        ("rerank/invoke", "invoke_rerank"),
        ("multimodal_rerank/invoke", "invoke_multimodal_rerank"),
        ("tts/invoke", "invoke_tts"),
        ("tts/model/voices", "get_tts_model_voices"),
        ("speech2text/invoke", "invoke_speech2text"),
        ("moderation/invoke", "invoke_moderation"),
        ("model/validate_provider_credentials", "validate_provider_credentials"),
        ("model/validate_model_credentials", "validate_model_credentials"),
        ("model/schema", "get_ai_model_schemas"),
    ),
    *_routes("agent_strategy", ("agent_strategy/invoke", "invoke_agent_strategy")),
    *_routes(
        "oauth",
        ("oauth/get_authorization_url", "get_authorization_url"),
        ("oauth/get_credentials", "get_credentials"),
        ("oauth/refresh_credentials", "refresh_credentials"),
    ),
    *_routes(
        "datasource",
        ("datasource/validate_credentials", "validate_datasource_credentials"),
        ("datasource/get_website_crawl", "invoke_website_datasource_get_crawl"),
        ("datasource/get_online_document_pages", "invoke_online_document_datasource_get_pages"),
        (
            "datasource/get_online_document_page_content",
            "invoke_online_document_datasource_get_page_content",
        ),
        ("datasource/online_drive_browse_files", "invoke_online_drive_browse_files"),
        ("datasource/online_drive_download_file", "invoke_online_drive_download_file"),
    ),
    *_routes(
        "dynamic_parameter", ("dynamic_select/fetch_parameter_options", "fetch_parameter_options")
    ),
    *_routes(
        "trigger",
        ("trigger/invoke_event", "invoke_trigger_event"),
        ("trigger/validate_credentials", "validate_trigger_credentials"),
        ("trigger/dispatch_event", "dispatch_trigger_event"),
        ("trigger/subscribe", "subscribe_trigger"),
        ("trigger/unsubscribe", "unsubscribe_trigger"),
        ("trigger/refresh", "refresh_trigger"),
    ),
)

BY_PATH: Final[dict[str, DispatchRoute]] = {route.path: route for route in ROUTES}


def lookup(path: str) -> DispatchRoute | None:
    """The route for ``path`` (the part after ``dispatch/``), or None if upstream has none."""
    return BY_PATH.get(path.strip("/"))
