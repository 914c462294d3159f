from typing import Any

from dify_plugin import ToolProvider


class CalcProvider(ToolProvider):
    def _validate_credentials(self, credentials: dict[str, Any]) -> None:
        """The calculator needs no credentials, so any set is valid."""
