"""Deterministic 16-dimensional unit vectors: the SHA-256 of the text, scaled to [-1, 1]."""

import hashlib
import math
from decimal import Decimal

from dify_plugin import TextEmbeddingModel
from dify_plugin.entities.model import EmbeddingInputType
from dify_plugin.entities.model.text_embedding import EmbeddingUsage, TextEmbeddingResult
from provider.parrot import ERROR_MAPPING, check_credentials

DIMENSIONS = 16


def embed(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()[:DIMENSIONS]
    vector = [byte / 127.5 - 1.0 for byte in digest]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


class ParrotTextEmbeddingModel(TextEmbeddingModel):
    def _invoke(
        self,
        model: str,
        credentials: dict,
        texts: list[str],
        user: str | None = None,
        input_type: EmbeddingInputType = EmbeddingInputType.DOCUMENT,
    ) -> TextEmbeddingResult:
        tokens = sum(self.get_num_tokens(model, credentials, texts))
        return TextEmbeddingResult(
            model=model,
            embeddings=[embed(text) for text in texts],
            usage=EmbeddingUsage(
                tokens=tokens,
                total_tokens=tokens,
                unit_price=Decimal(0),
                price_unit=Decimal("0.000001"),
                total_price=Decimal(0),
                currency="USD",
                latency=0.0,
            ),
        )

    def get_num_tokens(self, model: str, credentials: dict, texts: list[str]) -> list[int]:
        return [len(text.split()) for text in texts]

    def validate_credentials(self, model: str, credentials: dict) -> None:
        check_credentials(credentials)

    @property
    def _invoke_error_mapping(self) -> dict:
        return ERROR_MAPPING
