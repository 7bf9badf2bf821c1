"""Hugging Face hub access: fail fast and clearly when the hub cannot be reached."""

from __future__ import annotations

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


def quiet_progress_bars() -> None:
    """Model loading draws progress bars on stderr; the server logs instead."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
