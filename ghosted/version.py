"""The installed ghosted version (recorded in checkpoints, metrics and the registry)."""

__version__ = "0.1.0"
