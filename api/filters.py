"""Filters on image records, as the API takes them: in a search's JSON body (`filter`), or as query parameters
of the listing and of search by image. One parser turns either into the index's ImageFilter."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar.params import Parameter

from api.errors import ApiError
from contract.messages import END
from infra.vectors import ImageFilter

MAX_VALUES = 20
SOURCE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}" + END)
CONTENT_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]{1,63}/[A-Za-z0-9!#$&^_.+-]{1,63}" + END)

SOURCE_DOC = "only images with this `source` (upload, bucket, backfill, or what an upstream message set); repeatable"
CONTENT_TYPE_DOC = "only images of this detected content type, e.g. image/png; repeatable"
AFTER_DOC = "only images indexed after this ISO-8601 time (UTC when no offset is given)"
BEFORE_DOC = "only images indexed before this ISO-8601 time (UTC when no offset is given)"


def repeated_query(pattern: re.Pattern[str]) -> dict[str, Any]:
    """The document's constraints on a filter as a query parameter (`?source=a&source=b`, one value being an array
    of one): each value matches `pattern`."""
    return {"items": {"type": "string", "pattern": pattern.pattern}, "minItems": 1, "maxItems": MAX_VALUES}


def repeatable(pattern: re.Pattern[str]) -> dict[str, Any]:
    """The same filter in a JSON body, which takes one value, several, or null: a lone value matches `pattern` too."""
    return {"pattern": pattern.pattern, **repeated_query(pattern)}


TIME = {"format": "date-time"}
SourceParam = Annotated[list[str] | None, Parameter(description=SOURCE_DOC, schema_extra=repeated_query(SOURCE))]
ContentTypeParam = Annotated[
    list[str] | None, Parameter(description=CONTENT_TYPE_DOC, schema_extra=repeated_query(CONTENT_TYPE))
]
CreatedAfterParam = Annotated[str | None, Parameter(description=AFTER_DOC, schema_extra=TIME)]
CreatedBeforeParam = Annotated[str | None, Parameter(description=BEFORE_DOC, schema_extra=TIME)]


class SearchFilter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Conditions a result must meet; all given ones apply."""

    source: Annotated[str | list[str] | None, msgspec.Meta(description=SOURCE_DOC)] = None
    content_type: Annotated[str | list[str] | None, msgspec.Meta(description=CONTENT_TYPE_DOC)] = None
    created_after: Annotated[str | None, msgspec.Meta(description=AFTER_DOC, examples=["2026-11-01T00:00:00Z"])] = None
    created_before: Annotated[str | None, msgspec.Meta(description=BEFORE_DOC)] = None


def _values(name: str, given: str | list[str] | None, pattern: re.Pattern[str], example: str) -> tuple[str, ...]:
    if given is None:
        return ()
    values = [given] if isinstance(given, str) else given
    if not values or len(values) > MAX_VALUES:
        raise ApiError(400, "invalid_request", f"{name}: give 1 to {MAX_VALUES} values")
    for value in values:
        if not pattern.match(value):
            raise ApiError(400, "invalid_request", f"{name}: {value!r} is not a valid value (e.g. {example})")
    return tuple(dict.fromkeys(values))


def _micros(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ApiError(
            400, "invalid_request", f"{name}: {value!r} is not an ISO-8601 time (e.g. 2026-11-01T00:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def image_filter(
    source: str | list[str] | None = None,
    content_type: str | list[str] | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
) -> ImageFilter | None:
    """The index filter, or None when nothing is filtered; a 400 that names the field for a bad value."""
    parsed = ImageFilter(
        sources=_values("source", source, SOURCE, "upload"),
        content_types=_values("content_type", content_type, CONTENT_TYPE, "image/png"),
        created_after_us=_micros("created_after", created_after),
        created_before_us=_micros("created_before", created_before),
    )
    return None if parsed.is_empty else parsed


def from_body(given: SearchFilter | None) -> ImageFilter | None:
    if given is None:
        return None
    return image_filter(given.source, given.content_type, given.created_after, given.created_before)


def query_string(
    source: list[str] | None, content_type: list[str] | None, created_after: str | None, created_before: str | None
) -> list[tuple[str, str]]:
    """The filter as query parameters again (for the next-page link)."""
    pairs = [("source", value) for value in source or []]
    pairs += [("content_type", value) for value in content_type or []]
    pairs += [(name, value) for name, value in (("created_after", created_after), ("created_before", created_before))]
    return [(name, value) for name, value in pairs if value is not None]
