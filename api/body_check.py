"""Request bodies are checked before Litestar decodes them into the route's `data`, for the failures Litestar would
let through as 500s. A `before_request` hook runs before the body is parsed for the handler, and what it reads is
cached for the handler.

- JSON: msgspec raises RecursionError for deep nesting and UnicodeDecodeError for invalid UTF-8. A route whose
  `data` is JSON decodes the body as JSON whatever the Content-Type header says (clients that send JSON as
  text/plain, or as curl's default form type, are served), so every such route's body is checked.
- multipart: a text field is decoded in the charset its part declares (UTF-8 when none), which raises
  UnicodeDecodeError for bytes that are not in it and LookupError for a charset Python does not know. The form
  is parsed here (Request.form, which caches it for the route's extractor) and those become a 400."""

from __future__ import annotations

import msgspec
from litestar import Request
from litestar.enums import RequestEncodingType

from api.errors import ApiError

_NOT_JSON = (RequestEncodingType.MULTI_PART, RequestEncodingType.URL_ENCODED, RequestEncodingType.MESSAGEPACK)


async def check_body(request: Request) -> None:
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    media_type = _data_media_type(request)
    if media_type is None:
        return
    if media_type == RequestEncodingType.MULTI_PART:
        await _check_form(request)
    elif media_type not in _NOT_JSON:
        await _check_json(request)


async def _check_json(request: Request) -> None:
    try:
        msgspec.json.decode(await request.body())
    except RecursionError:
        raise ApiError(400, "malformed_json", "the JSON body is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, "malformed_json", f"the JSON body is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    except msgspec.DecodeError:
        return  # Litestar's own parsing reports it, with the route's context


async def _check_form(request: Request) -> None:
    """Parse a multipart body now; one that is not multipart is left to the route's extractor, which says so."""
    content_type, options = request.content_type
    if content_type != RequestEncodingType.MULTI_PART or not options.get("boundary"):
        return
    try:
        await request.form()
    except UnicodeDecodeError as exc:
        raise ApiError(
            400,
            "invalid_request",
            f"a text field of the form is not valid {exc.encoding}: {exc.reason} at byte {exc.start}; send text "
            "fields in UTF-8 (or name their charset in the part's Content-Type)",
        ) from None
    except LookupError as exc:
        raise ApiError(
            400, "invalid_request", f"a text field of the form names a charset this server does not know: {exc}"
        ) from None


def _data_media_type(request: Request) -> str | None:
    """How the route's handler takes its `data` parameter (None when it takes none); JSON unless it says otherwise."""
    data = request.route_handler.parsed_data_field
    if data is None:
        return None
    return getattr(data.kwarg_definition, "media_type", None) or RequestEncodingType.JSON
