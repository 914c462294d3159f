"""Real SDK plugins that call back into Dify, keep data and serve HTTP, for the tests.

``write_relayer`` writes ``acme/relayer``: tools that stream an LLM reply through Dify, call a
tool, embed, fetch an app and use storage; an agent strategy that asks the LLM and a tool; and
an endpoint group (``/hello``, ``/echo``, ``/stream``) with a secret and a plain setting. Its
manifest grants tool, model (llm, text-embedding), app, endpoint and 2 KiB of storage.
``write_bare`` writes ``acme/bare``, the same tools without any permission.

Each tool reports what it did as JSON messages; a call that fails raises, so the task fails
with the exception's message (what the SDK raised for the call).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Final

from plugin_factory import ICON, SDK_REQUIREMENT

MODEL_PROVIDER: Final = "langgenius/fake/fake"
STORAGE_SIZE: Final = 2048

PERMISSION: Final = f"""\
  permission:
    tool:
      enabled: true
    model:
      enabled: true
      llm: true
      text_embedding: true
    app:
      enabled: true
    endpoint:
      enabled: true
    storage:
      enabled: true
      size: {STORAGE_SIZE}
"""

TOOLS: Final = {
    "ask": """\
        from dify_plugin.entities.model.llm import LLMModelConfig
        from dify_plugin.entities.model.message import UserPromptMessage

        config = LLMModelConfig(
            provider=MODEL_PROVIDER, model="m1", mode="chat", completion_params={}
        )
        chunks = self.session.model.llm.invoke(
            model_config=config,
            prompt_messages=[UserPromptMessage(content=str(tool_parameters.get("q", "")))],
            stream=True,
        )
        for chunk in chunks:
            yield self.create_text_message(str(chunk.delta.message.content))
        """,
    "use_tool": """\
        from dify_plugin.entities.tool import ToolProviderType

        messages = self.session.tool.invoke(
            ToolProviderType.BUILT_IN, "time", "current_time", {"zone": "UTC"}
        )
        for message in messages:
            yield self.create_json_message(
                {"type": message.type.value, "message": message.message.model_dump()}
            )
        """,
    "embed": """\
        from dify_plugin.entities.model.text_embedding import TextEmbeddingModelConfig

        config = TextEmbeddingModelConfig(provider=MODEL_PROVIDER, model="e1")
        result = self.session.model.text_embedding.invoke(
            model_config=config, texts=["ab", "abcd"]
        )
        yield self.create_json_message({"embeddings": result.embeddings})
        """,
    "fetch_app": """\
        info = self.session.app.fetch_app(str(tool_parameters.get("app_id")))
        yield self.create_json_message({"app": dict(info)})
        """,
    "store": """\
        storage = self.session.storage
        op, key = tool_parameters.get("op"), str(tool_parameters.get("key", ""))
        if op == "set":
            storage.set(key, str(tool_parameters.get("value", "")).encode())
            out = {"set": key}
        elif op == "get":
            out = {"get": storage.get(key).decode()}
        elif op == "del":
            storage.delete(key)
            out = {"deleted": key}
        else:
            out = {"exist": storage.exist(key)}
        yield self.create_json_message(out)
        """,
}

AGENT: Final = """\
    from collections.abc import Generator

    from dify_plugin.entities.agent import AgentInvokeMessage
    from dify_plugin.entities.model.llm import LLMModelConfig
    from dify_plugin.entities.model.message import UserPromptMessage
    from dify_plugin.entities.tool import ToolProviderType
    from dify_plugin.interfaces.agent import AgentStrategy

    MODEL_PROVIDER = "{provider}"


    class ThinkStrategy(AgentStrategy):
        def _invoke(self, parameters: dict) -> Generator[AgentInvokeMessage]:
            query = str(parameters.get("query", ""))
            config = LLMModelConfig(
                provider=MODEL_PROVIDER, model="m1", mode="chat", completion_params={{}}
            )
            result = self.session.model.llm.invoke(
                model_config=config,
                prompt_messages=[UserPromptMessage(content=query)],
                stream=False,
            )
            answer = str(result.message.content)
            yield self.create_text_message(f"the model said: {{answer}}")
            used = self.session.tool.invoke(
                ToolProviderType.BUILT_IN, "time", "current_time", {{"question": answer}}
            )
            for message in used:
                if message.type == message.MessageType.TEXT:
                    yield self.create_text_message(f"the tool said: {{message.message.text}}")
            yield self.create_json_message({{"done": True}})
"""

ENDPOINTS: Final = {
    "hello": (
        "GET",
        "/hello",
        """\
        import json
        from collections.abc import Mapping

        from werkzeug import Request, Response

        from dify_plugin import Endpoint


        class HelloEndpoint(Endpoint):
            def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
                seen = {
                    "greeting": settings.get("greeting"),
                    "api_key": settings.get("api_key"),
                    "path": r.path,
                    "q": r.args.get("q"),
                    "hook_id": r.headers.get("Dify-Hook-Id"),
                    "hook_url": r.headers.get("Dify-Hook-Url"),
                    "forwarded": r.headers.get("X-Forwarded-For"),
                    "real_ip": r.headers.get("X-Real-Ip"),
                    "custom": r.headers.get("X-Custom"),
                }
                return Response(json.dumps(seen), status=200, content_type="application/json")
        """,
    ),
    "echo": (
        "POST",
        "/echo",
        """\
        from collections.abc import Mapping

        from werkzeug import Request, Response

        from dify_plugin import Endpoint


        class EchoEndpoint(Endpoint):
            def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
                body = r.get_data()
                return Response(
                    body[::-1],
                    status=201,
                    headers={"X-Echo-Length": str(len(body))},
                    content_type="application/octet-stream",
                )
        """,
    ),
    "stream": (
        "GET",
        "/stream",
        """\
        import time
        from collections.abc import Mapping

        from werkzeug import Request, Response

        from dify_plugin import Endpoint


        class StreamEndpoint(Endpoint):
            def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
                def parts():
                    for i in range(4):
                        yield f"part-{i}\\n"
                        time.sleep(0.3)

                return Response(parts(), status=200, content_type="text/plain")
        """,
    ),
}


def _tool_source(name: str, body: str) -> str:
    camel = "".join(p.capitalize() for p in name.split("_"))
    return (
        "from collections.abc import Generator\nfrom typing import Any\n\n"
        "from dify_plugin import Tool\nfrom dify_plugin.entities.tool import ToolInvokeMessage\n\n"
        f'MODEL_PROVIDER = "{MODEL_PROVIDER}"\n\n\n'
        f"class {camel}Tool(Tool):\n"
        "    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage]:\n"
        + textwrap.indent(textwrap.dedent(body), " " * 8)
    )


def write_relayer(dest: Path, *, name: str = "relayer", permitted: bool = True) -> Path:
    """Write the plugin (``acme/<name>``) into ``dest``; see the module docstring."""
    files: dict[str, str] = {
        "main.py": (
            "from dify_plugin import DifyPluginEnv, Plugin\n\n"
            "plugin = Plugin(DifyPluginEnv())\n\n"
            'if __name__ == "__main__":\n    plugin.run()\n'
        ),
        "requirements.txt": SDK_REQUIREMENT + "\n",
        "_assets/icon.svg": ICON,
        "provider/tools.yaml": textwrap.dedent(
            f"""\
            identity:
              author: acme
              name: {name}
              label:
                en_US: {name}
              description:
                en_US: Tools that call back into Dify.
              icon: icon.svg
            tools:
            """
        )
        + "".join(f"  - tools/{tool}.yaml\n" for tool in TOOLS)
        + "extra:\n  python:\n    source: provider/tools.py\n",
        "provider/tools.py": (
            "from typing import Any\n\nfrom dify_plugin import ToolProvider\n\n\n"
            "class RelayerProvider(ToolProvider):\n"
            "    def _validate_credentials(self, credentials: dict[str, Any]) -> None:\n"
            "        pass\n"
        ),
        "provider/agent.yaml": textwrap.dedent(
            """\
            identity:
              author: acme
              name: thinker
              label:
                en_US: Thinker
              description:
                en_US: An agent strategy that asks the model, then a tool.
              icon: icon.svg
            strategies:
              - strategies/think.yaml
            """
        ),
        "strategies/think.yaml": textwrap.dedent(
            """\
            identity:
              name: think
              author: acme
              label:
                en_US: Think
            description:
              en_US: Asks the model, then a tool.
            parameters:
              - name: query
                type: string
                required: true
                label:
                  en_US: Query
            extra:
              python:
                source: strategies/think.py
            """
        ),
        "strategies/think.py": textwrap.dedent(AGENT).format(provider=MODEL_PROVIDER),
        "group/relayer.yaml": textwrap.dedent(
            """\
            settings:
              - name: api_key
                type: secret-input
                required: true
                label:
                  en_US: API key
              - name: greeting
                type: text-input
                required: false
                label:
                  en_US: Greeting
            endpoints:
            """
        )
        + "".join(f"  - endpoints/{e}.yaml\n" for e in ENDPOINTS),
    }
    for tool, body in TOOLS.items():
        files[f"tools/{tool}.yaml"] = textwrap.dedent(
            f"""\
            identity:
              name: {tool}
              author: acme
              label:
                en_US: {tool}
            description:
              human:
                en_US: {tool}
              llm: {tool}
            parameters: []
            extra:
              python:
                source: tools/{tool}.py
            """
        )
        files[f"tools/{tool}.py"] = _tool_source(tool, body)
    for endpoint, (method, path, source) in ENDPOINTS.items():
        files[f"endpoints/{endpoint}.yaml"] = (
            f'path: "{path}"\nmethod: "{method}"\nextra:\n  python:\n'
            f"    source: endpoints/{endpoint}.py\n"
        )
        files[f"endpoints/{endpoint}.py"] = textwrap.dedent(source)
    files["manifest.yaml"] = (
        textwrap.dedent(
            f"""\
        version: 0.1.0
        type: plugin
        author: acme
        name: {name}
        label:
          en_US: {name}
        description:
          en_US: A plugin that calls back into Dify, for the tests.
        icon: icon.svg
        created_at: "2025-01-01T00:00:00Z"
        resource:
          memory: 268435456
        """
        )
        + (PERMISSION if permitted else "")
        + textwrap.dedent(
            """\
        plugins:
          tools:
            - provider/tools.yaml
          agent_strategies:
            - provider/agent.yaml
          endpoints:
            - group/relayer.yaml
        meta:
          version: 0.0.1
          arch: [amd64, arm64]
          runner:
            language: python
            version: "3.12"
            entrypoint: main
        """
        )
    )
    for rel, content in files.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    return dest


def write_bare(dest: Path) -> Path:
    """``acme/bare``: the relayer's code with no permission at all."""
    return write_relayer(dest, name="bare", permitted=False)
