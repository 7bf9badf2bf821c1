"""Errors raised while loading and running models."""

from infra.startup import StartupError


class ModelLoadError(StartupError):
    """A model could not be loaded; the message says how to fix it, in one line."""


class DeviceMemoryError(Exception):
    """A model call ran out of device memory (the allocator's cached blocks are released by then). The same call may
    fit later, once what else holds the device's memory lets go, or with less at once (a smaller batch or image)."""

    code = "device_memory_unavailable"  # a job's error code, and an API error's
