"""The ``plugind`` command: one module per group of subcommands, ``main`` parses and dispatches."""

from plugind.cli.main import main

__all__ = ["main"]
