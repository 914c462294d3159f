"""The "audio" is the text itself: ``PARROT/<voice>:`` then each word, one chunk per word.

Not playable; deterministic, and the parrot's speech2text model reads it back.
"""

from collections.abc import Generator

from dify_plugin import TTSModel
from provider.parrot import ERROR_MAPPING, check_credentials

MAGIC = b"PARROT/"


class ParrotTTSModel(TTSModel):
    def _invoke(
        self,
        model: str,
        tenant_id: str,
        credentials: dict,
        content_text: str,
        voice: str,
        user: str | None = None,
    ) -> Generator[bytes, None, None]:
        yield MAGIC + voice.encode() + b":"
        for index, word in enumerate(content_text.split()):
            yield (word if index == 0 else " " + word).encode()

    def validate_credentials(self, model: str, credentials: dict) -> None:
        check_credentials(credentials)

    @property
    def _invoke_error_mapping(self) -> dict:
        return ERROR_MAPPING
