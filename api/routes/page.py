"""The web page: `/` and its assets under `/ui/<version>/` (open: the page holds no data; it asks for an API key
when the server has keys, and sends it with its own requests)."""

from __future__ import annotations

from litestar import Response, get
from litestar.enums import MediaType

from api.auth import OPEN
from api.errors import ApiError
from api.page import page_files, render_page
from api.services import Services

# the page loads only its own scripts and styles; images, audio and results may come from R2's presigned URLs
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data: https:; "
        "media-src 'self' blob: https:; connect-src 'self' https:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_FOREVER = "public, max-age=31536000, immutable"


@get("/", opt=OPEN, include_in_schema=False, media_type=MediaType.HTML)
async def page(services: Services) -> Response[str]:
    """The page itself: revalidated on every load, so a new release's assets are picked up at once."""
    return Response(
        render_page(services.settings),
        media_type=MediaType.HTML,
        headers={**_SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


@get("/ui/{version:str}/{path:path}", opt=OPEN, include_in_schema=False)
async def page_asset(version: str, path: str) -> Response[bytes]:
    files = page_files()
    asset = files.assets.get(path.lstrip("/"))
    if version != files.version or asset is None:
        raise ApiError(404, "not_found", f"no page asset {path!r} in this release; reload the page")
    return Response(asset.data, media_type=asset.media_type, headers={**_SECURITY_HEADERS, "Cache-Control": _FOREVER})


ROUTES = [page, page_asset]
