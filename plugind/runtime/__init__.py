"""Running Dify plugins: environments, processes, the stdio protocol.

The path of a plugin through this package, once ``plugind.package`` has verified and unpacked
it: :func:`ensure_environment` builds its virtual environment with uv from the Python
:func:`find_plugin_python` picks; :class:`PluginPool` runs it as long-lived processes speaking
Dify's stdio protocol and sends them :class:`PluginRequest` s.
"""

from plugind.runtime.environment import ensure_environment
from plugind.runtime.interpreter import find_plugin_python
from plugind.runtime.pool import PluginPool, PoolSnapshot
from plugind.runtime.process import PluginProcess
from plugind.runtime.protocol import PluginRequest

__all__ = [
    "PluginPool",
    "PluginProcess",
    "PluginRequest",
    "PoolSnapshot",
    "ensure_environment",
    "find_plugin_python",
]
