"""Handlers turn one command into effects and events: install, uninstall, task."""
