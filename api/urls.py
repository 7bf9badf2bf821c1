"""Absolute URLs for responses."""

from __future__ import annotations

from urllib.parse import urlsplit

from litestar import Request

from infra.settings import Settings
from infra.storage.local import FILES_ROUTE


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


def redirect_target(settings: Settings, url: str) -> str:
    """Where a download redirect sends the client. A signed link of the embedded store is a route of this server:
    it is given as a path (PUBLIC_BASE_URL's path, if it has one, and the route), so the client follows it at the
    address it called, which need not be PUBLIC_BASE_URL's (a browser, or this server's own page, may not reach
    that one, or may not load from it). R2's presigned URLs stay as they are."""
    base = settings.public_base_url
    if base and url.startswith(f"{base}{FILES_ROUTE}"):
        return urlsplit(base).path + url[len(base) :]
    return url


def absolute(request: Request, settings: Settings, url: str) -> str:
    """Links of the embedded store are paths on this server; R2's are already absolute."""
    return f"{base_url(request, settings)}{url}" if url.startswith("/") else url
