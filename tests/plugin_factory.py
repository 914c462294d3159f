"""Real Dify SDK plugins, written by tests into temporary folders.

``write_plugin`` produces a plugin folder the ``dify-plugin`` SDK accepts (manifest, one tool
provider named like the plugin, one YAML and one Python file per tool), and ``package_bytes``
zips it into a `.difypkg`. Each tool is given as the body of its ``_invoke(self,
tool_parameters)``, a generator: yield ``self.create_text_message(...)`` or
``self.create_json_message(...)``. The bodies below are the usual ones.
"""

from __future__ import annotations

import contextlib
import functools
import os
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import pytest

from plugind.errors import PlugindError
from plugind.package.difypkg import build_package
from plugind.runtime.environment import ensure_environment
from plugind.runtime.interpreter import find_plugin_python
from plugind.runtime.protocol import PluginRequest

SDK_REQUIREMENT = "dify-plugin==0.10.2"

ECHO = """\
yield self.create_json_message({"echo": dict(tool_parameters)})
"""

RAISES = """\
raise ValueError(tool_parameters.get("message", "the tool failed on purpose"))
yield  # unreachable: makes _invoke a generator
"""

CRASH = """\
import os, sys
yield self.create_text_message("about to crash")
print("crashy: calling os._exit(3)", file=sys.stderr, flush=True)
os._exit(3)
"""

SLEEP = """\
import time
seconds = float(tool_parameters.get("seconds", 1))
time.sleep(seconds)
yield self.create_json_message({"slept": seconds})
"""

ENV = """\
import os
yield self.create_json_message({"env": dict(os.environ)})
"""

SPAWN = """\
import subprocess
child = subprocess.Popen(["sleep", "60"])
yield self.create_json_message({"child_pid": child.pid})
"""

BACKWARDS = """\
value = self.session.storage.get("answer")
yield self.create_text_message(value.decode())
"""

HOG = """\
import subprocess, sys, time
size = int(tool_parameters.get("mib", 400)) * 1024 * 1024
if tool_parameters.get("in_child"):  # a child in the plugin's process group holds it
    hold = f"import time; hog = b'x' * {size}; time.sleep(60)"
    subprocess.Popen([sys.executable, "-c", hold])
else:
    hog = b"x" * size  # written, so resident
time.sleep(float(tool_parameters.get("seconds", 30)))
yield self.create_json_message({"held_mib": size >> 20})
"""

STANDARD_TOOLS = {
    "echo": ECHO,
    "raises": RAISES,
    "crash": CRASH,
    "sleep": SLEEP,
    "env": ENV,
    "spawn": SPAWN,
    "backwards": BACKWARDS,
}

ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16">'
    '<rect width="16" height="16" fill="#888"/></svg>\n'
)


class Plugin(NamedTuple):
    """A plugin ready to run: what the pool needs to start it."""

    identifier: str
    workdir: Path
    python: Path
    entrypoint: str = "main"


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_")) or "Tool"


def write_plugin(
    dest: Path,
    *,
    author: str = "acme",
    name: str = "tester",
    version: str = "0.1.0",
    tools: dict[str, str] | None = None,
) -> Path:
    """Write an SDK plugin into ``dest`` (created) and return ``dest``."""
    tools = STANDARD_TOOLS if tools is None else tools
    provider = name.replace("-", "_")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "_assets").mkdir(exist_ok=True)
    (dest / "provider").mkdir(exist_ok=True)
    (dest / "tools").mkdir(exist_ok=True)
    (dest / "_assets" / "icon.svg").write_text(ICON)
    (dest / "requirements.txt").write_text(SDK_REQUIREMENT + "\n")
    (dest / "main.py").write_text(
        "from dify_plugin import DifyPluginEnv, Plugin\n\n"
        "plugin = Plugin(DifyPluginEnv())\n\n"
        'if __name__ == "__main__":\n'
        "    plugin.run()\n"
    )
    (dest / "manifest.yaml").write_text(
        textwrap.dedent(
            f"""\
            version: {version}
            type: plugin
            author: {author}
            name: {name}
            label:
              en_US: {name}
            description:
              en_US: A plugin written by a test.
            icon: icon.svg
            created_at: "2025-01-01T00:00:00Z"
            resource:
              memory: 268435456
            plugins:
              tools:
                - provider/{provider}.yaml
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
    tool_list = "".join(f"  - tools/{tool}.yaml\n" for tool in tools)
    (dest / "provider" / f"{provider}.yaml").write_text(
        f"identity:\n  author: {author}\n  name: {provider}\n  label:\n    en_US: {name}\n"
        f"  description:\n    en_US: Test tools.\n  icon: icon.svg\n"
        f"tools:\n{tool_list}extra:\n  python:\n    source: provider/{provider}.py\n"
    )
    (dest / "provider" / f"{provider}.py").write_text(
        "from typing import Any\n\nfrom dify_plugin import ToolProvider\n\n\n"
        f"class {_camel(provider)}Provider(ToolProvider):\n"
        "    def _validate_credentials(self, credentials: dict[str, Any]) -> None:\n"
        "        pass\n"
    )
    for tool, body in tools.items():
        (dest / "tools" / f"{tool}.yaml").write_text(
            f"identity:\n  name: {tool}\n  author: {author}\n  label:\n    en_US: {tool}\n"
            f"description:\n  human:\n    en_US: {tool}\n  llm: {tool}\n"
            f"parameters: []\nextra:\n  python:\n    source: tools/{tool}.py\n"
        )
        (dest / "tools" / f"{tool}.py").write_text(
            "from collections.abc import Generator\nfrom typing import Any\n\n"
            "from dify_plugin import Tool\n"
            "from dify_plugin.entities.tool import ToolInvokeMessage\n\n\n"
            f"class {_camel(tool)}Tool(Tool):\n"
            "    def _invoke(\n"
            "        self, tool_parameters: dict[str, Any]\n"
            "    ) -> Generator[ToolInvokeMessage]:\n"
            + textwrap.indent(textwrap.dedent(body), " " * 8)
        )
    return dest


def with_environment(folder: Path, identifier: str) -> Plugin:
    """``folder`` with its uv environment built, ready to run; skips the test without a Python."""
    try:
        python = find_plugin_python(os.environ.get("PLUGIN_PYTHON"))
    except PlugindError as exc:
        pytest.skip(f"no interpreter for plugins: {exc.message}")
    venv_python = anyio.run(functools.partial(ensure_environment, folder, python, timeout=300))
    return Plugin(identifier, folder, venv_python)


def tool(provider: str, name: str, **params: Any) -> PluginRequest:
    """A tool invocation as Dify sends it."""
    payload = {"provider": provider, "tool": name, "tool_parameters": params, "credentials": {}}
    return PluginRequest("tool", "invoke_tool", payload, user_id="u1")


def json_of(chunks: list[Any]) -> list[Any]:
    """The JSON messages among a tool's chunks."""
    return [c["message"]["json_object"] for c in chunks if c["type"] == "json"]


def package_bytes(folder: Path) -> bytes:
    """The `.difypkg` of a plugin folder."""
    return build_package(folder)


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` from ``/proc`` (``Z`` for a zombie), ``None`` if it is gone."""
    with (
        contextlib.suppress(FileNotFoundError, ProcessLookupError),
        open(f"/proc/{pid}/stat", "rb") as stat_file,
    ):
        return stat_file.read().rsplit(b")", 1)[1].split()[0].decode()
    return None


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped does not count)."""
    return process_state(pid) not in (None, "Z", "X")
