"""Strict JSON bodies.

Litestar validates bodies in lax mode (query strings need "5" -> 5), which would also accept {"seed": "42"}.
Routes with a JSON body keep their typed `data` parameter (validation, OpenAPI) and then re-read the cached
body strictly, so a string, or a number with a fraction, where the schema says integer is refused with a clear 400.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from litestar import Request

from api.errors import ApiError

T = TypeVar("T")
# integers a float represents exactly
_MAX_EXACT_INT = 2**53


async def strict_json(request: Request, schema: type[T]) -> T:
    return strict_convert(await json_document(request), schema)


async def json_document(request: Request) -> Any:
    """The body as plain JSON values (integral floats as integers), for more than one strict_convert."""
    try:
        return _integral_floats_as_ints(msgspec.json.decode(await request.body()))
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {exc}") from None


def strict_convert(document: Any, schema: type[T]) -> T:
    try:
        return msgspec.convert(document, type=schema, strict=True)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None


def _integral_floats_as_ints(value: Any) -> Any:
    """JSON has one number type: 20.0 is the integer 20 (JSON Schema agrees, and so does every JavaScript client),
    while 20.5 stays a float that an integer field refuses."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT_INT:
        return int(value)
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    return value
