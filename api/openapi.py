"""What the OpenAPI document says beyond the route signatures, so that it matches what the server sends: the one
error body, every status each route can answer, the media types of binary answers, and who may call what.

Routes declare their own statuses with `errors(...)` next to the code that raises them; `finish_document` adds
what only the whole app knows (strict request bodies refuse unknown fields, this server's own limits).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Litestar
from litestar.enums import ParamType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import (
    Components,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    PathItem,
    Reference,
    RequestBody,
    Schema,
    SecurityRequirement,
    SecurityScheme,
)

from api.filters import CONTENT_TYPE, SOURCE, TIME, SearchFilter, repeatable
from api.schemas import (
    GenerateImageRequest,
    ImageJobRequest,
    JobAccepted,
    SearchRequest,
    VoiceFromKeyRequest,
    VoiceJobRequest,
)
from contract.events import JobFinishedV1
from contract.messages import END, MAX_REF_TEXT_CHARS, MAX_SEED, NON_BLANK, VOICE_LANGUAGES
from infra.settings import Settings
from infra.storage.local import MAX_SEGMENT_BYTES

BEARER = "bearer"

_STATUSES = {
    400: "The request is malformed or invalid (bad JSON, unknown or mistyped field, bad Host): `message` says what "
    "to fix",
    401: "This server needs an API key (API_KEYS) and none, or an invalid one, was sent",
    403: "The API key's level is below what this route needs",
    404: "No such image, job or object",
    406: "The Accept header refuses the media type this request answers with (stream=true: audio/mpeg)",
    408: "The request body stopped arriving for HTTP_READ_TIMEOUT_SECONDS",
    409: "The index holds IMAGE_SEARCH_MAX_ELEMENTS images, or the Idempotency-Key was used for another request",
    410: "The Idempotency-Key names a job whose generated output was deleted, OUTPUT_TTL_DAYS after it finished",
    413: "The body, a file in it, or its number of multipart parts is over this route's limit",
    422: "Well-formed, but the content cannot be used (not an image or audio clip, unsupported language, too costly)",
    414: "The request target is longer than HTTP_MAX_REQUEST_LINE_BYTES",
    429: "RATE_LIMIT_PER_MINUTE reached; Retry-After says when to come back",
    431: "Too many headers, or too many header bytes (HTTP_MAX_HEADERS, HTTP_MAX_HEADER_BYTES)",
    503: "A dependency (broker, storage, index, the model's device memory) is unavailable, or the feature is off on "
    "this server; Retry-After is set when waiting helps",
}
# what any route can answer before its own code runs (Host check, request-head limits); guarded routes add
# 401/403/429
_EVERY_ROUTE = (400, 414, 431)
_GUARDED_ROUTE = (401, 403, 429)


STRICT_BODIES = (
    GenerateImageRequest,
    ImageJobRequest,
    VoiceJobRequest,
    SearchRequest,
    SearchFilter,
    VoiceFromKeyRequest,
)
# the 202 of routes that wait for their job: queued, or still running past SYNC_TIMEOUT_SECONDS
ACCEPTED = {
    202: ResponseSpec(JobAccepted, description="The job is queued or still running: poll `status_url`"),
}


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error the API sends."""

    status: int
    code: str
    message: str
    details: Any = None


def errors(*statuses: int, open_route: bool = False) -> dict[int, ResponseSpec]:
    """The error responses of a route: those it raises itself plus those every (guarded) route can answer."""
    every = {*_EVERY_ROUTE, *(() if open_route else _GUARDED_ROUTE), *statuses}
    return {
        status: ResponseSpec(data_container=ErrorBody, description=_STATUSES[status], generate_examples=False)
        for status in sorted(every)
    }


def binary(media_type: str, description: str) -> ResponseSpec:
    """A success response whose body is bytes of one media type (image/png, audio/mpeg)."""
    return ResponseSpec(data_container=bytes, media_type=media_type, description=description, generate_examples=False)


def openapi_config(api_keys: bool) -> OpenAPIConfig:
    """The document at /schema; with API keys configured it declares the bearer scheme the guarded routes use."""
    schemes = {
        BEARER: SecurityScheme(type="http", scheme="bearer", description="an API key from API_KEYS or API_KEYS_FILE")
    }
    return OpenAPIConfig(
        title="AI model server",
        version="0.1.0",
        path="/schema",
        render_plugins=[SwaggerRenderPlugin()],
        components=Components(security_schemes=schemes if api_keys else None),
    )


def security(api_keys: bool) -> list[SecurityRequirement] | None:
    """The security requirement of guarded routes: a bearer key, when this server has keys."""
    return [{BEARER: []}] if api_keys else None


def _key_rest(max_segment: int | None) -> str:
    """The pattern of the rest of a storage key after its prefix: segments without '/', '\\' or control
    characters, none empty, none '.' or '..' (stricter than the server: no segment starts with '.'), each at most
    `max_segment` characters when the store limits them (the embedded store: MAX_SEGMENT_BYTES, a file name; the
    limit is in bytes, which a pattern cannot count beyond ASCII)."""
    tail = "*" if max_segment is None else f"{{0,{max_segment - 1}}}"
    segment = rf"[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]{tail}"
    return f"(?:{segment}/)*{segment}{END}"


def _constraints(settings: Settings) -> dict[tuple[str, str], dict[str, Any]]:
    """Limits the server checks in code (or that this server's settings choose), stated in the document:
    (component, property) -> Schema attributes."""
    nonblank: dict[str, Any] = {"pattern": NON_BLANK}
    text = {**nonblank, "max_length": settings.voice_max_text_chars}
    ref_text = {**nonblank, "max_length": MAX_REF_TEXT_CHARS}
    language = {"enum": list(VOICE_LANGUAGES)}
    segment_limit = None if settings.r2_enabled else MAX_SEGMENT_BYTES
    return {
        ("GenerateImageRequest", "prompt"): nonblank,
        ("GenerateImageRequest", "seed"): {"minimum": 0, "maximum": MAX_SEED},
        # Litestar drops a zero lower bound (ge=0.0)
        ("GenerateImageRequest", "guidance_scale"): {"minimum": 0.0},
        ("SearchRequest", "query"): nonblank,
        ("SearchFilter", "source"): repeatable(SOURCE),
        ("SearchFilter", "content_type"): repeatable(CONTENT_TYPE),
        ("SearchFilter", "created_after"): TIME,
        ("SearchFilter", "created_before"): TIME,
        ("VoiceFromKeyRequest", "text"): text,
        ("VoiceFromKeyRequest", "ref_text"): ref_text,
        ("VoiceFromKeyRequest", "language"): language,
        ("VoiceFromKeyRequest", "ref_audio_key"): {
            "pattern": "^" + re.escape(settings.voice_ref_prefix) + _key_rest(segment_limit)
        },
        ("VoiceCloneForm", "text"): text,
        ("VoiceCloneForm", "ref_text"): ref_text,
        ("VoiceCloneForm", "language"): language,
    }


def finish_document(app: Litestar, settings: Settings) -> None:
    """What only the whole app knows: strict request bodies refuse unknown fields (Litestar leaves that out), the
    limits checked in code or set by this server's settings, parameters that are text, never null, response headers
    typed, and the callback a job's callback_url gets."""
    document = app.openapi_schema
    jobs = document.paths["/v1/jobs"].post
    if jobs is None:
        raise TypeError("POST /v1/jobs is not in the OpenAPI document")
    # the operations that take a callback_url, each with the runtime expression that names it in their request
    callbacks: list[tuple[Operation, str]] = [(jobs, "{$request.body#/callback_url}")]
    for path in (document.paths or {}).values():
        operations = (path.get, path.put, path.post, path.delete, path.options, path.head, path.patch, path.trace)
        for operation in filter(None, operations):
            for parameter in operation.parameters or ():
                if isinstance(parameter, Parameter) and isinstance(parameter.schema, Schema):
                    _not_null(parameter.schema)
                if isinstance(parameter, Parameter) and (parameter.name, parameter.param_in) == _CALLBACK_QUERY:
                    callbacks.append((operation, "{$request.query.callback_url}"))
            for response in (operation.responses or {}).values():
                for header in (response.headers or {}).values() if isinstance(response, OpenAPIResponse) else ():
                    _typed(header)
    schemas = document.components.schemas or {}
    for struct in STRICT_BODIES:
        _schema(schemas, struct.__name__).additional_properties = False
    for (component, name), attributes in _constraints(settings).items():
        field = (_schema(schemas, component).properties or {})[name]
        if not isinstance(field, Schema):
            raise TypeError(f"the OpenAPI property {component}.{name} is not a schema")
        aliases = field.field_aliases()
        for attribute, value in attributes.items():
            setattr(field, aliases.get(attribute, attribute), value)
    event = _add_event_components(schemas)
    for operation, url in callbacks:
        _describe_callbacks(operation, url, event)


# the headers a callback carries (Standard Webhooks): name -> description
_CALLBACK_HEADERS = {
    "webhook-id": "the event's event_id: the same on every try of one end (drop repeats by it)",
    "webhook-timestamp": "when this try was signed, in Unix seconds",
    "webhook-signature": 'space-separated "v1,<base64 HMAC-SHA256 of <webhook-id>.<webhook-timestamp>.<body>>", one '
    "per key of CALLBACK_SECRET",
}


# the callback_url query parameter of the endpoints that take one beside a body of their own
_CALLBACK_QUERY = ("callback_url", ParamType.QUERY)


def _add_event_components(schemas: dict[str, Any]) -> dict[str, Any]:
    """Put the schema of the event a callback carries (JobFinishedV1, and what it refers to) among the components;
    returns a reference to it."""
    (event,), components = msgspec.json.schema_components([JobFinishedV1], ref_template="#/components/schemas/{name}")
    for name, component in components.items():
        if schemas.setdefault(name, component) is not component:
            raise TypeError(f"the OpenAPI component {name} is already taken")
    return event


def _describe_callbacks(operation: Operation, url: str, event: dict[str, Any]) -> None:
    """The request a job's callback_url gets once the job ended (README, Callbacks), as an OpenAPI callback of the
    operation that takes the URL; `url` is the runtime expression that names the URL in the operation's request,
    `event` the schema of the body."""
    headers = [
        Parameter(
            name=name,
            param_in=ParamType.HEADER,
            required=True,
            description=description,
            schema=Schema(type=OpenAPIType.STRING),
        )
        for name, description in _CALLBACK_HEADERS.items()
    ]
    post = Operation(
        summary="The job's end, POSTed to its callback_url, signed as Standard Webhooks sign",
        description=(
            "2xx delivers it; 408, 425, 429, 5xx, a timeout or a connection failure is retried (after 1, 5, 30, 120 s, "
            "no sooner than a Retry-After asks, MAX_ATTEMPTS tries); other answers, redirects included, are not. At "
            "least once: drop repeats by webhook-id."
        ),
        parameters=headers,
        request_body=RequestBody(content={"application/json": OpenAPIMediaType(schema=event)}, required=True),
        responses={"2XX": OpenAPIResponse(description="Delivered")},
    )
    operation.callbacks = {"jobEnded": {url: PathItem(post=post)}}


def _typed(header: OpenAPIHeader | Reference) -> None:
    """A response header that Litestar documents without a schema (ResponseHeader takes none), which OpenAPI does
    not allow, as the text it is."""
    if isinstance(header, OpenAPIHeader) and header.schema is None and header.content is None:
        header.schema = Schema(type=OpenAPIType.STRING)


def _not_null(schema: Schema) -> None:
    """An optional parameter's schema (Litestar: one of the type and null) as its type alone. A query or header
    value is text, never null: leaving the parameter out is how a client sends nothing. (With the null, checkers
    that make invalid values count `?cursor=0` or `?source=false`, sent as the text "0" and "false", as a number
    or a boolean the server should have refused.)"""
    choices = [choice for choice in schema.one_of or () if not (isinstance(choice, Schema) and choice.type == "null")]
    if schema.one_of is None or len(choices) != 1 or not isinstance(choices[0], Schema):
        return
    (kept,) = choices
    schema.one_of = None
    schema.type = kept.type
    schema.items = schema.items or kept.items


def _schema(schemas: dict[str, Schema], name: str) -> Schema:
    schema = schemas[name]
    if not isinstance(schema, Schema):
        raise TypeError(f"the OpenAPI component {name} is not a schema")
    return schema
