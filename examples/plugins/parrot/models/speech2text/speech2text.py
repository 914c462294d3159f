"""Reads back what the parrot's TTS wrote (``PARROT/<voice>:<text>``); other audio is described
by its size and first bytes."""

from typing import IO

from dify_plugin import Speech2TextModel
from provider.parrot import ERROR_MAPPING, check_credentials

MAGIC = b"PARROT/"


class ParrotSpeech2TextModel(Speech2TextModel):
    def _invoke(
        self, model: str, credentials: dict, file: IO[bytes], user: str | None = None
    ) -> str:
        audio = file.read()
        if audio.startswith(MAGIC) and b":" in audio:
            return audio.split(b":", 1)[1].decode("utf-8", "replace")
        return f"{len(audio)} bytes of audio starting {audio[:4].hex()}"

    def validate_credentials(self, model: str, credentials: dict) -> None:
        check_credentials(credentials)

    @property
    def _invoke_error_mapping(self) -> dict:
        return ERROR_MAPPING
