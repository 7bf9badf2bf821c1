"""Wire types of the HTTP API (msgspec Structs; multipart forms are dataclasses, as Litestar expects)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec
from litestar.datastructures import UploadFile


class ImageOut(msgspec.Struct, kw_only=True):
    """An indexed image."""

    id: str
    r2_key: str
    content_type: str
    size: int
    width: int
    height: int
    created_at: str
    source: str
    filename: str | None
    file_url: Annotated[str, msgspec.Meta(description="redirects to a short-lived download URL")]


class JobAccepted(msgspec.Struct, kw_only=True):
    """A job was queued; poll `status_url` until its result is there."""

    job_id: str
    status: str
    status_url: str


class SearchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    query: Annotated[str, msgspec.Meta(min_length=1, max_length=1000, description="text in any language")]
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10


class SearchHit(msgspec.Struct, kw_only=True):
    id: str
    score: Annotated[float, msgspec.Meta(description="cosine similarity, higher is closer")]
    r2_key: str
    file_url: str
    content_type: str
    width: int
    height: int
    created_at: str
    filename: str | None


class SearchResponse(msgspec.Struct, kw_only=True):
    results: list[SearchHit]


@dataclass
class ImageUploadForm:
    file: UploadFile
