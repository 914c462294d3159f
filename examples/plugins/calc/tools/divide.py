from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class DivideTool(Tool):
    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage]:
        a, b = tool_parameters["a"], tool_parameters["b"]
        if b == 0:
            raise ZeroDivisionError(f"cannot divide {a} by zero")
        quotient = a / b
        yield self.create_json_message({"quotient": quotient})
        yield self.create_text_message(str(quotient))
