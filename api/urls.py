"""Absolute URLs for responses."""

from __future__ import annotations

from litestar import Request

from infra.settings import Settings


def base_url(request: Request, settings: Settings) -> str:
    """PUBLIC_BASE_URL when set, else the scheme and host the client used."""
    if settings.public_base_url:
        return settings.public_base_url
    return str(request.base_url).rstrip("/")


def image_file_url(request: Request, settings: Settings, image_id: str) -> str:
    return f"{base_url(request, settings)}/v1/images/{image_id}/file"


def image_url(request: Request, settings: Settings, image_id: str) -> str:
    return f"{base_url(request, settings)}/v1/images/{image_id}"
