"""Feature toggles as a guard: a route names the features it needs in its `opt` (`needs(...)`), and a request for a
feature that is off on this server gets 503 `feature_disabled` (`r2_disabled` for the R2 endpoints) before any of
the route's own code runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from api.errors import ApiError
from infra.settings import Settings

FEATURES = "features"
INSTEAD = "instead"

# feature -> (what it is, the setting that turns it on, whether this server has it on)
_TOGGLES: dict[str, tuple[str, str, Callable[[Settings], bool]]] = {
    "index": ("image search", "IMAGE_SEARCH_ENABLED", lambda settings: settings.image_search_enabled),
    "image": ("image generation", "IMAGE_ENABLED", lambda settings: settings.image_enabled),
    "voice": ("voice generation", "VOICE_ENABLED", lambda settings: settings.voice_enabled),
    "r2": ("R2", "R2_ENABLED", lambda settings: settings.r2_enabled),
}


def needs(*features: str, instead: str | None = None) -> dict[str, Any]:
    """The `opt` entries of a route that needs `features`; `instead` names the endpoint to use without R2."""
    unknown = set(features) - set(_TOGGLES)
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; known: {sorted(_TOGGLES)}")
    return {FEATURES: features, INSTEAD: instead}


def require_feature(settings: Settings, feature: str, instead: str | None = None) -> None:
    """Raise 503 `feature_disabled` (or `r2_disabled`) when `feature` is off on this server."""
    if not _TOGGLES[feature][2](settings):
        raise feature_disabled(feature, instead)


def feature_disabled(feature: str, instead: str | None = None) -> ApiError:
    what, setting, _ = _TOGGLES[feature]
    if feature == "r2":
        return ApiError(503, "r2_disabled", f"R2 is disabled on this server ({setting}=0); use {instead}")
    return ApiError(503, "feature_disabled", f"{what} is disabled on this server ({setting}=0)")


class FeatureGuard:
    """The guard, `(connection, handler)`; async so that Litestar runs it on the event loop."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    async def __call__(self, connection: ASGIConnection, handler: BaseRouteHandler) -> None:
        for feature in handler.opt.get(FEATURES, ()):
            require_feature(self._settings, feature, handler.opt.get(INSTEAD))
