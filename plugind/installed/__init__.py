"""Installed plugins as the workers see them: which version each tenant has (the registry) and
which are ready to run on this node (extracted, environment built)."""
