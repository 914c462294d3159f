"""Every kind of call the SDK makes back into Dify: where it goes, how it answers, what it needs.

Paths are under ``$DIFY_INNER_API_URL/inner/api/`` (dify-api's
``controllers/inner_api/plugin/plugin.py``; the Go daemon's ``dify_invocation/calldify``).
Streamed kinds answer with length-prefixed frames, one ``response`` to the plugin per frame;
the others with one JSON document. ``needs`` names the manifest permission a kind requires
(``resource.permission``), as the Go daemon's ``permissionMapping``: model kinds need the model
permission and their model type's flag; ``upload_file`` needs none. ``storage`` never leaves
plugind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    path: str | None  # under /inner/api/; None: served by plugind itself
    streamed: bool
    needs: str  # a permission of :class:`plugind.backwards.permission.Permission`, or ""


KINDS: Final[dict[str, Kind]] = {
    kind.name: kind
    for kind in (
        Kind("tool", "invoke/tool", True, "tool"),
        Kind("llm", "invoke/llm", True, "llm"),
        Kind("llm_structured_output", "invoke/llm/structured-output", True, "llm"),
        Kind("text_embedding", "invoke/text-embedding", False, "text_embedding"),
        Kind("multimodal_embedding", "invoke/multimodal-embedding", False, "text_embedding"),
        Kind("rerank", "invoke/rerank", False, "rerank"),
        Kind("multimodal_rerank", "invoke/multimodal-rerank", False, "rerank"),
        Kind("tts", "invoke/tts", True, "tts"),
        Kind("speech2text", "invoke/speech2text", False, "speech2text"),
        Kind("moderation", "invoke/moderation", False, "moderation"),
        Kind("node_parameter_extractor", "invoke/parameter-extractor", False, "node"),
        Kind("node_question_classifier", "invoke/question-classifier", False, "node"),
        Kind("app", "invoke/app", True, "app"),
        Kind("fetch_app", "fetch/app/info", False, "app"),
        Kind("system_summary", "invoke/summary", False, "llm"),
        Kind("upload_file", "upload/file/request", False, ""),
        Kind("storage", None, False, "storage"),
    )
}

# The inner API route that encrypts and decrypts endpoint settings (never a plugin's call).
ENCRYPT_PATH: Final = "invoke/encrypt"
_MODEL_KINDS: Final = frozenset(
    {
        "llm",
        "llm_structured_output",
        "text_embedding",
        "multimodal_embedding",
        "rerank",
        "multimodal_rerank",
        "tts",
        "speech2text",
        "moderation",
    }
)
MAX_TARGET: Final = 256


def target_of(kind: str, request: dict[str, Any]) -> str:
    """What a call is about, for the audit log: never prompts, values or credentials."""

    def text(value: Any) -> str:
        return value if isinstance(value, str) else ""

    def joined(source: Any, *names: str) -> str:
        source = source if isinstance(source, dict) else {}
        return "/".join(part for part in (text(source.get(n)) for n in names) if part)

    if kind in _MODEL_KINDS:
        target = joined(request, "provider", "model")
    elif kind == "tool":
        target = joined(request, "provider", "tool")
    elif kind in ("node_parameter_extractor", "node_question_classifier"):
        target = joined(request.get("model"), "provider", "name")
    elif kind in ("app", "fetch_app"):
        target = text(request.get("app_id"))
    elif kind == "storage":
        target = text(request.get("opt"))
    elif kind == "upload_file":
        target = text(request.get("mimetype"))
    else:
        target = ""
    return target[:MAX_TARGET]
