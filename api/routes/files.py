"""Downloads through the embedded store's signed, expiring URLs (R2 serves its own presigned URLs)."""

from __future__ import annotations

from typing import Annotated

from litestar import Response, get
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK

from api.auth import OPEN
from api.errors import ApiError
from api.openapi import binary, errors
from api.services import Services
from infra.storage.local import LocalStore


@get(
    "/v1/files/{key:path}",
    summary="Download an object of the embedded store with a signed URL",
    opt=OPEN,
    responses={
        HTTP_200_OK: binary("application/octet-stream", "The object, with the content type it was stored with"),
        **errors(403, 404, 503, open_route=True),
    },
)
async def signed_file(
    services: Services,
    key: str,
    expires: Annotated[int, Parameter(description="expiry, seconds since the epoch")],
    signature: str,
) -> Response[bytes]:
    store = services.store
    if not isinstance(store, LocalStore):
        raise ApiError(404, "not_found", "signed file URLs are only served when R2 is disabled")
    object_key = key.lstrip("/")
    if not store.verify(object_key, expires, signature):
        raise ApiError(403, "invalid_signature", "the link is invalid or has expired; ask for a new one")
    stored = await store.get(object_key)
    return Response(
        stored.data,
        media_type=stored.content_type,
        # served as stored, never as what a browser would guess from the bytes
        headers={"Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff"},
    )


ROUTES = [signed_file]
