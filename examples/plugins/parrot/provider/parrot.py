from collections.abc import Mapping
from typing import Any

from dify_plugin import ModelProvider
from dify_plugin.errors.model import CredentialsValidateFailedError, InvokeError

INVALID_KEY = "invalid"


def check_credentials(credentials: Mapping[str, Any]) -> None:
    """Every credential set is valid except an ``api_key`` of "invalid" (to test the refusal)."""
    if credentials.get("api_key") == INVALID_KEY:
        raise CredentialsValidateFailedError("the parrot does not accept the API key 'invalid'")


# The parrot raises Dify's own invoke errors, so there is nothing to map.
ERROR_MAPPING: dict[type[InvokeError], list[type[Exception]]] = {}


class ParrotProvider(ModelProvider):
    def validate_provider_credentials(self, credentials: dict) -> None:
        check_credentials(credentials)
