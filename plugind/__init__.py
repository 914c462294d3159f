"""plugind: an event-sourced plugin daemon for Dify on Redis Streams and Postgres."""

from plugind.errors import PlugindError

__version__ = "0.1.0"

__all__ = ["PlugindError", "__version__"]
