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


def image_thumbnail_url(request: Request, settings: Settings, image_id: str) -> str:
    return f"{base_url(request, settings)}/v1/images/{image_id}/thumbnail"


def job_url(request: Request, settings: Settings, job_id: str) -> str:
    return f"{base_url(request, settings)}/v1/jobs/{job_id}"


def absolute(request: Request, settings: Settings, url: str) -> str:
    """Links of the embedded store are paths on this server; R2's are already absolute."""
    return f"{base_url(request, settings)}{url}" if url.startswith("/") else url
