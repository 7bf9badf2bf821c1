"""The one place where domain errors become HTTP responses.

Every error body has the same shape: {"status": int, "code": "machine_code", "message": "what to fix"}
plus "details" where there is more to say (e.g. which field failed validation).
"""

from __future__ import annotations

from typing import Any

import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from contract.audio import InvalidAudioError
from contract.imaging import InvalidImageError
from infra.broker import BrokerUnavailableError
from infra.storage import InvalidKeyError, ObjectNotFoundError, StorageError, StorageUnavailableError
from infra.vectors import VectorIndexUnavailableError
from models.errors import DeviceMemoryError

log = structlog.get_logger(__name__)


# what a 503 for a dependency that is down or busy (broker, storage, index) tells the client to wait, in seconds
RETRY_AFTER_SECONDS = 5


class ApiError(Exception):
    """An error with its HTTP status, machine code and a message that says what to fix; `retry_after` (seconds)
    for a condition that passes."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        *,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = with_retry_after(headers, retry_after)


def with_retry_after(headers: dict[str, str] | None, retry_after: int | None) -> dict[str, str]:
    return {**(headers or {}), **({"Retry-After": str(retry_after)} if retry_after is not None else {})}


def error_response(
    status: int, code: str, message: str, details: Any = None, *, headers: dict[str, str] | None = None
) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {"status": status, "code": code, "message": message}
    if details:
        body["details"] = details
    return Response(body, status_code=status, media_type="application/json", headers=headers or None)


# Litestar's words (an InternalServerException) for a client that closed its connection while its body was read
_CLIENT_DISCONNECTED = "client disconnected prematurely"

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


def _api_error(_: Request, exc: ApiError) -> Response[dict[str, Any]]:
    return error_response(exc.status, exc.code, exc.message, exc.details, headers=exc.headers)


def validation_error(_: Request, exc: ValidationException) -> Response[dict[str, Any]]:
    details = exc.extra if isinstance(exc.extra, list) else []
    repeated = [
        item.get("key")
        for item in details
        if isinstance(item, dict) and "Unsupported type: <class 'list'>" in str(item.get("message", ""))
    ]
    if repeated:
        fields = ", ".join(f"`{key}`" for key in repeated)
        return error_response(400, "invalid_request", f"send one {fields} field, not several")
    if any(item == {"message": "'data'", "key": "data", "source": "body"} for item in details):
        # Litestar's words for a request without a body
        return error_response(400, "invalid_request", "the request needs a body; the API document (/schema) shows it")
    problems = [
        f"{item.get('key', '?')}: {item.get('message', 'invalid')}" for item in details if isinstance(item, dict)
    ]
    message = "; ".join(problems) if problems else (exc.detail or "the request is invalid")
    return error_response(400, "invalid_request", message, exc.extra)


def _http(request: Request, exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    if status == 413:
        limit = request.route_handler.resolve_request_max_body_size()
        message = f"the request body is larger than {limit} bytes" if limit else "the request body is too large"
        return error_response(413, "payload_too_large", message)
    if status == 400 and exc.detail == "Request Entity Too Large":
        return _multipart_limit(request, exc)
    if status == 400 and exc.detail == "Invalid multipart/form-data":
        content_type = request.headers.get("content-type", "none")
        return error_response(
            400,
            "invalid_request",
            f"the body must be multipart/form-data with the fields this endpoint documents (got {content_type})",
        )
    if isinstance(exc.__cause__, SerializationException):
        return error_response(400, "malformed_json", f"the request body is not valid JSON: {exc.detail}")
    if status == 500 and exc.detail == _CLIENT_DISCONNECTED:
        return _client_disconnected(request)
    if status >= 500:
        log.error("http_error", status=status, detail=exc.detail)
    headers = dict(exc.headers or {})
    if status == 429:
        retry = headers.get("RateLimit-Reset", "60")
        headers["Retry-After"] = retry
        return error_response(
            429, "too_many_requests", f"rate limit reached (RATE_LIMIT_PER_MINUTE); retry in {retry} s", headers=headers
        )
    return error_response(
        status, _HTTP_CODES.get(status, "error"), exc.detail or "request failed", exc.extra, headers=headers or None
    )


def _client_disconnected(request: Request) -> Response[dict[str, Any]]:
    """The client closed its connection before its request body had arrived (Litestar raises a 500 for it): no
    fault of the server's, and the answer reaches nobody."""
    log.info("client_disconnected", method=request.method, path=request.url.path)
    return error_response(400, "client_disconnected", "the connection closed before the request body arrived")


def _multipart_limit(request: Request, exc: HTTPException) -> Response[dict[str, Any]]:
    """Litestar's multipart parser past one of its limits (the parser's own error is the context Litestar hides):
    the number of parts (multipart_form_part_limit), or the size or number of one part's header lines."""
    if "header" in str(exc.__context__):
        return error_response(
            400,
            "invalid_request",
            f"a part of the multipart body has a header line over 4 KiB or too many header lines ({exc.__context__}); "
            "shorten the file name",
        )
    limit = request.app.multipart_form_part_limit
    return error_response(
        413, "too_many_parts", f"the multipart body has more than {limit} parts; send the documented fields only"
    )


def _invalid_content(_: Request, exc: InvalidImageError | InvalidAudioError) -> Response[dict[str, Any]]:
    return error_response(422, exc.code, exc.message)


def _invalid_key(_: Request, exc: InvalidKeyError) -> Response[dict[str, Any]]:
    return error_response(400, "invalid_key", str(exc))


def _not_found(_: Request, exc: ObjectNotFoundError) -> Response[dict[str, Any]]:
    return error_response(404, "object_not_found", str(exc))


def _unavailable(code: str, what: str) -> Any:
    def handler(_: Request, exc: Exception) -> Response[dict[str, Any]]:
        log.warning("dependency_unavailable", dependency=what, error=str(exc))
        return error_response(
            503,
            code,
            f"{what} is unavailable right now; retry shortly ({exc})",
            headers=with_retry_after(None, RETRY_AFTER_SECONDS),
        )

    return handler


def _storage(_: Request, exc: StorageError) -> Response[dict[str, Any]]:
    log.error("storage_error", error=str(exc))
    return error_response(503, "storage_error", f"the object store refused the operation: {exc}")


def _unexpected(_: Request, exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled_error", error=str(exc))
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "internal_error", "internal error; see the server log")


EXCEPTION_HANDLERS: dict[type[Exception], Any] = {
    ApiError: _api_error,
    ValidationException: validation_error,
    HTTPException: _http,
    InvalidImageError: _invalid_content,
    InvalidAudioError: _invalid_content,
    InvalidKeyError: _invalid_key,
    ObjectNotFoundError: _not_found,
    StorageUnavailableError: _unavailable("storage_unavailable", "the object store"),
    VectorIndexUnavailableError: _unavailable("index_unavailable", "the vector index"),
    BrokerUnavailableError: _unavailable("broker_unavailable", "the message broker"),
    DeviceMemoryError: _unavailable(DeviceMemoryError.code, "the model's device memory"),
    StorageError: _storage,
    Exception: _unexpected,
}
