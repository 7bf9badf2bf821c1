"""Image records: upload (index), list, read, download and thumbnail redirects, delete."""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from typing import Annotated
from urllib.parse import urlencode

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.datastructures import ResponseHeader
from litestar.enums import RequestEncodingType
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, Parameter
from litestar.response import Redirect
from litestar.status_codes import HTTP_201_CREATED, HTTP_202_ACCEPTED, HTTP_307_TEMPORARY_REDIRECT

from api.auth import ADMIN, READ, WRITE
from api.errors import ApiError
from api.features import feature_disabled, needs
from api.filters import (
    ContentTypeParam,
    CreatedAfterParam,
    CreatedBeforeParam,
    SourceParam,
    image_filter,
    query_string,
)
from api.jobs import accepted, allowed_callback_url, check_idempotency_key, finished_result, start_job
from api.openapi import errors
from api.parameters import CALLBACK_URL, IDEMPOTENCY_KEY
from api.schemas import ImageOut, ImageUploadForm, JobAccepted
from api.services import Services
from api.thumbnails import Thumbnails
from api.urls import base_url, image_file_url, image_thumbnail_url, redirect_target
from contract.image_ids import thumbnail_key
from contract.imaging import check_image
from contract.jobs import job_id_for_idempotency_key
from contract.messages import END, IMAGE_INDEX, MAX_FILENAME_CHARS, ImageIndexV1
from infra.vectors import ImageRecord, ListingPosition, VectorIndex

# a page cursor: the listing position of the page's last record, its creation time (microseconds since the epoch)
# and its id (32 hex digits), the next page starting strictly after it; a time alone is a cursor of the earlier
# form, which servers handed out before ties were broken: the next page starts before that microsecond
_CURSOR = re.compile(r"^([0-9]{1,18})(?:\.([0-9a-f]{32}))?" + END)


def require_index(services: Services) -> VectorIndex:
    """The index, for routes behind the `index` feature guard."""
    if services.index is None:
        raise feature_disabled("index")
    return services.index


async def find_image(index: VectorIndex, image_id: str) -> ImageRecord:
    """The record of an image, or the 404 for an unknown (or malformed) id."""
    record = await index.get(parse_image_id(image_id))
    if record is None:
        raise ApiError(404, "image_not_found", f"no image with id {image_id!r}")
    return record


def parse_image_id(image_id: str) -> str:
    try:
        return str(uuid.UUID(image_id))
    except ValueError:
        raise ApiError(404, "image_not_found", f"no image with id {image_id!r} (ids are UUIDs)") from None


def to_image_out(request: Request, services: Services, record: ImageRecord) -> ImageOut:
    return ImageOut(
        id=record.id,
        r2_key=record.r2_key,
        content_type=record.content_type,
        size=record.size,
        width=record.width,
        height=record.height,
        created_at=record.created_at,
        source=record.source,
        filename=record.filename,
        file_url=image_file_url(request, services.settings, record.id),
        thumbnail_url=image_thumbnail_url(request, services.settings, record.id),
    )


async def read_upload(form: ImageUploadForm, limit: int) -> bytes:
    data = await form.file.read(limit + 1)
    await form.file.close()
    if len(data) > limit:
        raise ApiError(413, "payload_too_large", f"the file is larger than {limit} bytes (IMAGE_SEARCH_MAX_BYTES)")
    return data


def _encode_cursor(record: ImageRecord) -> str:
    return f"{record.created_us}.{uuid.UUID(record.id).hex}"


def _decode_cursor(cursor: str) -> ListingPosition:
    matched = _CURSOR.match(cursor)
    if matched is None:
        raise ApiError(400, "invalid_cursor", "cursor is not one this server returned; start again without it")
    created_us, image_hex = matched.groups()
    image_id = None if image_hex is None else str(uuid.UUID(hex=image_hex))
    return ListingPosition(created_us=int(created_us), image_id=image_id)


@post(
    "/v1/images",
    status_code=HTTP_201_CREATED,
    summary="Upload an image and index it for search",
    opt={**WRITE, **needs("index")},
    responses={
        HTTP_202_ACCEPTED: ResponseSpec(JobAccepted, description="wait=false: queued for indexing"),
        **errors(408, 409, 413, 422, 503),
    },
)
async def upload_image(
    request: Request,
    services: Services,
    data: Annotated[ImageUploadForm, Body(media_type=RequestEncodingType.MULTI_PART)],
    wait: Annotated[
        bool, Parameter(description="wait for indexing (201 with the record) or return at once (202)")
    ] = True,
    idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None,
    callback_url: Annotated[str | None, CALLBACK_URL] = None,
) -> Response[ImageOut | JobAccepted]:
    """With an Idempotency-Key the image's id is derived from the key, so a retried upload of the same file finds
    the image (and its job) instead of adding it twice."""
    settings = services.settings
    index = require_index(services)
    key = check_idempotency_key(idempotency_key)
    callback = allowed_callback_url(services, callback_url)
    raw = await read_upload(data, settings.image_search_max_bytes)
    checked = await asyncio.to_thread(check_image, raw, settings.image_search_max_pixels)

    async def room_left() -> None:
        if await index.count() >= settings.image_search_max_elements:
            raise ApiError(
                409,
                "index_full",
                f"the index holds its maximum of {settings.image_search_max_elements} images "
                "(IMAGE_SEARCH_MAX_ELEMENTS); delete images or raise the limit",
            )

    image_id = str(uuid.uuid4()) if key is None else job_id_for_idempotency_key(IMAGE_INDEX, key)
    filename = data.file.filename or None
    if filename is not None and len(filename) > MAX_FILENAME_CHARS:
        raise ApiError(
            400,
            "invalid_request",
            f"the file's name is {len(filename)} characters; the limit is {MAX_FILENAME_CHARS}: rename it",
        )
    payload = ImageIndexV1(image_id=image_id, data=raw, filename=filename, source="upload")
    params: dict[str, object] = {"filename": filename, "size": len(raw), "content_type": checked.content_type}
    if key is not None:  # the same key with another file of the same name and size is another request
        params["sha256"] = hashlib.sha256(raw).hexdigest()
    started = await start_job(
        services,
        job_type=IMAGE_INDEX,
        payload=payload,
        wait=wait,
        params=params,
        job_id=image_id,
        idempotency_key=key,
        admit=room_left,
        callback_url=callback,
        request=request,
    )
    result = await finished_result(started)
    if result is None:
        return accepted(request, services, started.record)
    record = msgspec.convert(result, ImageRecord)
    if started.existing and await index.get(record.id) is None:
        raise ApiError(
            409,
            "image_deleted",
            f"the image this Idempotency-Key uploaded ({record.id}) has been deleted since; a retry does not bring "
            "it back: upload it with a new key",
        )
    return Response(to_image_out(request, services, record), status_code=HTTP_201_CREATED)


@get("/v1/images", summary="List images, newest first", opt={**READ, **needs("index")}, responses=errors(503))
async def list_images(
    request: Request,
    services: Services,
    limit: Annotated[int, Parameter(ge=1, le=1000, description="page size")] = 100,
    cursor: Annotated[
        str | None,
        Parameter(
            description="X-Next-Cursor of the previous page, as it was given (its form may change)",
            schema_extra={"pattern": _CURSOR.pattern},
        ),
    ] = None,
    source: SourceParam = None,
    content_type: ContentTypeParam = None,
    created_after: CreatedAfterParam = None,
    created_before: CreatedBeforeParam = None,
) -> Response[list[ImageOut]]:
    """A JSON array of image records, newest first; images created in the same microsecond come in the order of
    their ids. When more remain, the `X-Next-Cursor` header (and a `Link: rel="next"` header) give the cursor for
    the next page, which starts right after this page's last image (none is left out or listed twice, whatever the
    images share); pass the same filters with it."""
    index = require_index(services)
    conditions = image_filter(source, content_type, created_after, created_before)
    after = _decode_cursor(cursor) if cursor is not None else None
    records = await index.newest(limit + 1, after=after, image_filter=conditions)
    page, more = records[:limit], len(records) > limit
    headers: dict[str, str] = {}
    if more:
        next_cursor = _encode_cursor(page[-1])
        headers["X-Next-Cursor"] = next_cursor
        query = [("limit", str(limit)), ("cursor", next_cursor)]
        query += query_string(source, content_type, created_after, created_before)
        next_url = f"{base_url(request, services.settings)}/v1/images?{urlencode(query)}"
        headers["Link"] = f'<{next_url}>; rel="next"'
    return Response([to_image_out(request, services, record) for record in page], headers=headers)


@get(
    "/v1/images/{image_id:str}", summary="One image record", opt={**READ, **needs("index")}, responses=errors(404, 503)
)
async def get_image(request: Request, services: Services, image_id: str) -> ImageOut:
    record = await find_image(require_index(services), image_id)
    return to_image_out(request, services, record)


@get(
    "/v1/images/{image_id:str}/file",
    status_code=HTTP_307_TEMPORARY_REDIRECT,
    summary="Redirect to a short-lived download URL of the original",
    opt={**READ, **needs("index")},
    responses=errors(404, 503),
)
async def image_file(services: Services, image_id: str) -> Redirect:
    record = await find_image(require_index(services), image_id)
    url = await services.store.presigned_get_url(record.r2_key, services.settings.presign_ttl_seconds)
    return Redirect(redirect_target(services.settings, url), status_code=HTTP_307_TEMPORARY_REDIRECT)


@get(
    "/v1/images/{image_id:str}/thumbnail",
    status_code=HTTP_307_TEMPORARY_REDIRECT,
    summary="Redirect to a short-lived URL of the image's thumbnail (WebP), made now if it is missing",
    opt={**READ, **needs("index")},
    responses=errors(404, 422, 503),
    response_headers=[
        ResponseHeader(
            name="X-Thumbnail",
            documentation_only=True,
            description="`stored`: the thumbnail was there; `made`: it was made from the original on this request "
            "(an image indexed before thumbnails existed)",
        )
    ],
)
async def image_thumbnail(services: Services, image_id: str) -> Redirect:
    """404 `image_not_found` for an unknown id, 404 `original_not_found` when the thumbnail is missing and the
    original it would be made from is gone; 422 when that original is no longer an image this server reads."""
    record = await find_image(require_index(services), image_id)
    key, made = await _thumbnails(services).key(record)
    url = await services.store.presigned_get_url(key, services.settings.presign_ttl_seconds)
    return Redirect(
        redirect_target(services.settings, url),
        status_code=HTTP_307_TEMPORARY_REDIRECT,
        headers={"X-Thumbnail": "made" if made else "stored"},
    )


def _thumbnails(services: Services) -> Thumbnails:
    if services.thumbnails is None:
        raise feature_disabled("index")
    return services.thumbnails


@delete(
    "/v1/images/{image_id:str}",
    summary="Delete an image: its original, its thumbnail and its vector",
    opt={**ADMIN, **needs("index")},
    responses=errors(404, 503),
)
async def delete_image(services: Services, image_id: str) -> None:
    """Removes the original and the thumbnail first, then the point, so a failed delete can simply be retried."""
    index = require_index(services)
    record = await find_image(index, image_id)
    await services.store.delete(record.r2_key)
    await services.store.delete(thumbnail_key(record.id))
    await index.delete(record.id)


ROUTES = [upload_image, list_images, get_image, image_file, image_thumbnail, delete_image]
