"""Errors raised while loading models."""

from infra.startup import StartupError


class ModelLoadError(StartupError):
    """A model could not be loaded; the message says how to fix it, in one line."""
