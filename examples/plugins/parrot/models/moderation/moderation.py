"""Flags a text (returns true) when it contains a word of ``credentials.blocked_words``
(comma-separated; default "cracker")."""

from dify_plugin import ModerationModel
from provider.parrot import ERROR_MAPPING, check_credentials


class ParrotModerationModel(ModerationModel):
    def _invoke(self, model: str, credentials: dict, text: str, user: str | None = None) -> bool:
        blocked = {
            word.strip().lower()
            for word in str(credentials.get("blocked_words") or "cracker").split(",")
            if word.strip()
        }
        words = {word.lower().strip(".,;:!?") for word in text.split()}
        return bool(blocked & words)

    def validate_credentials(self, model: str, credentials: dict) -> None:
        check_credentials(credentials)

    @property
    def _invoke_error_mapping(self) -> dict:
        return ERROR_MAPPING
