"""Running Dify plugins: packages, environments, processes.

The path of a plugin through this package: :func:`read_package` verifies a `.difypkg` and
names it (``author/name:version@checksum``); :func:`extract` unpacks it into
:func:`install_dir`; :func:`ensure_environment` builds its virtual environment with uv from the
Python :func:`find_plugin_python` picks; :class:`PluginPool` runs it as long-lived processes
speaking Dify's stdio protocol and sends them :class:`PluginRequest` s.
"""

from plugind.runtime.environment import ensure_environment
from plugind.runtime.extract import extract
from plugind.runtime.interpreter import find_plugin_python
from plugind.runtime.package import (
    PluginPackage,
    build_package,
    dify_checksum,
    install_dir,
    parse_identifier,
    read_package,
)
from plugind.runtime.pool import PluginPool, PoolSnapshot
from plugind.runtime.process import PluginProcess
from plugind.runtime.protocol import PluginRequest

__all__ = [
    "PluginPackage",
    "PluginPool",
    "PluginProcess",
    "PluginRequest",
    "PoolSnapshot",
    "build_package",
    "dify_checksum",
    "ensure_environment",
    "extract",
    "find_plugin_python",
    "install_dir",
    "parse_identifier",
    "read_package",
]
