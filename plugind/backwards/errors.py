"""What can go wrong serving a plugin's call back into Dify.

The message of each is what the plugin reads: the SDK raises it as the exception of the call.
"""

from __future__ import annotations


class BackwardsError(Exception):
    """A call that cannot be served; ``str(exc)`` is the plugin's error message."""


class FrameError(BackwardsError):
    """Dify's answer is not in its length-prefixed frames (or a frame is too large)."""


class InnerApiError(BackwardsError):
    """Dify's inner API is unreachable, too slow, refused the call or answered an error."""


class StorageError(BackwardsError):
    """A storage operation refused (key rules, quota, a key never set) or failed."""
