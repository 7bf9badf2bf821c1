"""JSON bodies are checked before Litestar decodes them into the route's `data`: msgspec raises RecursionError for
deep nesting and UnicodeDecodeError for invalid UTF-8, which Litestar would let through as 500s. A `before_request`
hook runs before the body is parsed for the handler, and the body it reads is cached for the handler.

A route whose `data` is JSON decodes the body as JSON whatever the Content-Type header says (clients that send
JSON as text/plain, or as curl's default form type, are served), so every such route's body is checked."""

from __future__ import annotations

import msgspec
from litestar import Request
from litestar.enums import RequestEncodingType

from api.errors import ApiError

_NOT_JSON = (RequestEncodingType.MULTI_PART, RequestEncodingType.URL_ENCODED, RequestEncodingType.MESSAGEPACK)


async def check_json_body(request: Request) -> None:
    if request.method not in ("POST", "PUT", "PATCH") or not _decodes_json(request):
        return
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


def _decodes_json(request: Request) -> bool:
    """Whether the route's handler takes a `data` parameter that Litestar decodes from JSON."""
    data = request.route_handler.parsed_data_field
    if data is None:
        return False
    return getattr(data.kwarg_definition, "media_type", None) not in _NOT_JSON
