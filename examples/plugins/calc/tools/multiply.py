from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class MultiplyTool(Tool):
    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage]:
        product = tool_parameters["a"] * tool_parameters["b"]
        yield self.create_json_message({"product": product})
        yield self.create_text_message(str(product))
