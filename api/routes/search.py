"""Semantic search: by text (CLIP text tower, in this process), by example image (the image tower here, or an
indexing processor's: see api/queries.py), and images similar to an indexed one (its stored vector, no model)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from litestar import Request, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter

from api.auth import READ
from api.errors import ApiError
from api.features import feature_disabled, needs
from api.filters import ContentTypeParam, CreatedAfterParam, CreatedBeforeParam, SourceParam, from_body, image_filter
from api.openapi import errors
from api.queries import QueryEncoder
from api.routes.images import parse_image_id, read_upload, require_index
from api.schemas import ImageUploadForm, SearchHit, SearchRequest, SearchResponse
from api.services import Services
from api.strict import strict_json
from api.urls import image_file_url, image_thumbnail_url
from contract.imaging import decode_image
from contract.messages import is_blank
from infra.vectors import ImageRecord


def _queries(services: Services) -> QueryEncoder:
    if services.queries is None:
        raise feature_disabled("index")
    return services.queries


def _hits(request: Request, services: Services, found: list[tuple[ImageRecord, float]]) -> SearchResponse:
    return SearchResponse(
        results=[
            SearchHit(
                id=record.id,
                score=round(score, 6),
                r2_key=record.r2_key,
                file_url=image_file_url(request, services.settings, record.id),
                thumbnail_url=image_thumbnail_url(request, services.settings, record.id),
                content_type=record.content_type,
                width=record.width,
                height=record.height,
                created_at=record.created_at,
                filename=record.filename,
            )
            for record, score in found
        ]
    )


@post(
    "/v1/images/search",
    status_code=200,
    summary="Search images by text, in any language",
    opt={**READ, **needs("index")},
    responses=errors(408, 413, 503),
)
async def search_images(request: Request, services: Services, data: SearchRequest) -> SearchResponse:
    index = require_index(services)
    queries = _queries(services)
    data = await strict_json(request, SearchRequest)
    query = data.query.strip()
    if is_blank(query):
        raise ApiError(400, "invalid_request", "query must contain at least one non-space character")
    conditions = from_body(data.filter)
    vector = await queries.text(query)
    return _hits(request, services, await index.search(vector, data.limit, conditions))


@post(
    "/v1/images/search/by-image",
    status_code=200,
    summary="Search images by an example image",
    opt={**READ, **needs("index")},
    responses=errors(408, 413, 422, 503),
)
async def search_by_image(
    request: Request,
    services: Services,
    data: Annotated[ImageUploadForm, Body(media_type=RequestEncodingType.MULTI_PART)],
    limit: Annotated[int, Parameter(ge=1, le=100)] = 10,
    source: SourceParam = None,
    content_type: ContentTypeParam = None,
    created_after: CreatedAfterParam = None,
    created_before: CreatedBeforeParam = None,
) -> SearchResponse:
    index = require_index(services)
    queries = _queries(services)
    conditions = image_filter(source, content_type, created_after, created_before)
    raw = await read_upload(data, services.settings.image_search_max_bytes)
    decoded = await asyncio.to_thread(decode_image, raw, services.settings.image_search_max_pixels)
    vector = await queries.image(raw, decoded.image)
    return _hits(request, services, await index.search(vector, limit, conditions))


@get(
    "/v1/images/{image_id:str}/similar",
    summary="Images similar to an indexed one, most similar first (the image itself left out)",
    opt={**READ, **needs("index")},
    responses=errors(404, 503),
)
async def similar_images(
    request: Request,
    services: Services,
    image_id: str,
    limit: Annotated[int, Parameter(ge=1, le=100)] = 10,
    source: SourceParam = None,
    content_type: ContentTypeParam = None,
    created_after: CreatedAfterParam = None,
    created_before: CreatedBeforeParam = None,
) -> SearchResponse:
    """Searches with the image's stored vector (no model runs), with the filters of search by image."""
    index = require_index(services)
    conditions = image_filter(source, content_type, created_after, created_before)
    image_id = parse_image_id(image_id)
    vector = await index.vector(image_id)
    if vector is None:
        raise ApiError(404, "image_not_found", f"no image with id {image_id!r}")
    found = await index.search(vector, limit + 1, conditions)
    return _hits(request, services, [(record, score) for record, score in found if record.id != image_id][:limit])


ROUTES = [search_images, search_by_image, similar_images]
