"""Hugging Face hub access: fail fast and clearly when the hub cannot be reached."""

from __future__ import annotations

import importlib
import os
import socket
from urllib.parse import urlparse

import huggingface_hub.constants as hub_constants
import structlog

log = structlog.get_logger(__name__)

_checked: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection (checked once per process)."""
    global _checked
    if _checked is None:
        if hub_constants.HF_HUB_OFFLINE:
            _checked = False
        else:
            endpoint = urlparse(hub_constants.ENDPOINT)
            port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
            try:
                with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
                    _checked = True
            except OSError:
                _checked = False
    return _checked


def prefer_local_cache() -> None:
    """When the hub is unreachable, switch the hub client to offline mode so cached models load at once
    instead of after minutes of retries, and missing ones fail at once."""
    if not hub_reachable():
        if not hub_constants.HF_HUB_OFFLINE:
            log.warning("model_hub_unreachable", endpoint=hub_constants.ENDPOINT, using="local cache only")
        os.environ["HF_HUB_OFFLINE"] = "1"
        hub_constants.HF_HUB_OFFLINE = True


def offline_hint(variable: str) -> str:
    return (
        f"the model hub ({hub_constants.ENDPOINT}) is unreachable and the model is not in the local cache; "
        f"point {variable} at a local copy of the weights, or set MODEL_PROFILE=tiny for small random-weight "
        "test models"
    )


def route_library_output(*libraries: str) -> None:
    """transformers and diffusers draw progress bars and log through a stderr handler of their own, which would
    put plain-text lines (with user prompts in them) among the server's JSON logs: bars off, their records go to
    the root logger's handler (infra/logging.py) instead."""
    for library in libraries:
        library_logging = importlib.import_module(f"{library}.utils.logging")
        library_logging.disable_progress_bar()
        library_logging.disable_default_handler()
        library_logging.enable_propagation()
