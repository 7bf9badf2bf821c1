"""Strict JSON bodies.

Litestar validates bodies in lax mode (query strings need "5" -> 5), which would also accept {"seed": "42"}.
Routes with a JSON body keep their typed `data` parameter (validation, OpenAPI) and then re-read the cached
body strictly, so a string or a float where the schema says integer is refused with a clear 400.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
from litestar import Request

from api.errors import ApiError

T = TypeVar("T")


async def strict_json(request: Request, schema: type[T]) -> T:
    try:
        return msgspec.json.decode(await request.body(), type=schema)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {exc}") from None
