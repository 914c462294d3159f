"""Plugins calling back into Dify: backwards invocation, and plugin storage.

The runtime hands each ``invoke`` of a plugin to a :class:`Relay` (through the small interface
of :mod:`plugind.runtime.backwards`, so the core knows nothing of what is here). The relay
checks the manifest's permissions (:mod:`~plugind.backwards.permission`), then serves
``storage`` from Postgres (:mod:`~plugind.backwards.storage`) or relays the call to Dify's
inner API (:mod:`~plugind.backwards.inner_api`, reading its length-prefixed frames with
:mod:`~plugind.backwards.frames`). The Dify dialect uses the same client to have Dify encrypt
endpoint settings.
"""

from plugind.backwards.errors import BackwardsError, FrameError, InnerApiError, StorageError
from plugind.backwards.inner_api import InnerApi
from plugind.backwards.kinds import KINDS, Kind, target_of
from plugind.backwards.permission import Permission, Permissions
from plugind.backwards.relay import Relay
from plugind.backwards.storage import PluginStorage

__all__ = [
    "KINDS",
    "BackwardsError",
    "FrameError",
    "InnerApi",
    "InnerApiError",
    "Kind",
    "Permission",
    "Permissions",
    "PluginStorage",
    "Relay",
    "StorageError",
    "target_of",
]
