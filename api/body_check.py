"""JSON bodies are checked before Litestar decodes them into the route's `data`: msgspec raises RecursionError for
deep nesting and UnicodeDecodeError for invalid UTF-8, which Litestar would let through as 500s. A `before_request`
hook runs before the body is parsed for the handler, and the body it reads is cached for the handler."""

from __future__ import annotations

import msgspec
from litestar import Request

from api.errors import ApiError


async def check_json_body(request: Request) -> None:
    if request.method not in ("POST", "PUT", "PATCH") or request.content_type[0] != "application/json":
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
