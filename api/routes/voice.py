"""Voice cloning, the seed's two endpoints: MP3 bytes from an uploaded clip (whole, or streamed sentence by sentence
as it is spoken), or an MP3 in R2 from a clip in R2."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from typing import Annotated, Any

from litestar import Request, Response, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK

from api.auth import WRITE
from api.errors import ApiError
from api.features import needs
from api.jobs import JobStart, accepted, allowed_callback_url, finished_result, output_bytes, start_job
from api.openapi import ACCEPTED, binary, errors
from api.parameters import CALLBACK_URL, IDEMPOTENCY_KEY
from api.replies import ReplyPiece, StreamEvent
from api.schemas import GeneratedVoiceKey, JobAccepted, VoiceCloneForm, VoiceFromKeyRequest
from api.services import Services
from api.streaming import accepts, next_event, stream_pieces
from api.strict import strict_json
from contract.audio import check_audio
from contract.messages import (
    MAX_REF_TEXT_CHARS,
    VOICE_GENERATE,
    VOICE_LANGUAGES,
    VoiceGenerateV1,
    canonical_language,
    check_reference_key,
    is_blank,
)
from infra.storage import InvalidKeyError

MP3 = "audio/mpeg"
STREAM = Parameter(
    description="true: send the MP3 as it is spoken, sentence by sentence, in a chunked response that starts as soon "
    "as the first sentence is ready (no X-Audio-Duration); the stored object is the streamed bytes. Needs an Accept "
    "header that admits audio/mpeg (or none). A job that fails mid-stream ends the response before its last chunk "
    "(a truncated body). Past SYNC_TIMEOUT_SECONDS before the first sentence: 202 with the job, as without it"
)


def check_text_fields(services: Services, *, text: str, ref_text: str, language: str) -> str:
    """Validate what a voice request says; returns the model's name for the language."""
    canonical = canonical_language(language)
    if canonical is None:
        raise ApiError(
            422,
            "unsupported_language",
            f"language {language!r} is not supported; use one of {', '.join(VOICE_LANGUAGES)}",
            {"accepted": list(VOICE_LANGUAGES)},
        )
    if is_blank(text):
        raise ApiError(400, "invalid_request", "text must contain at least one non-space character")
    limit = services.settings.voice_max_text_chars
    if len(text) > limit:
        raise ApiError(
            400, "text_too_long", f"text is {len(text)} characters; the limit is {limit} (VOICE_MAX_TEXT_CHARS)"
        )
    if is_blank(ref_text):
        raise ApiError(400, "invalid_request", "ref_text (the transcript of the reference clip) must not be empty")
    if len(ref_text) > MAX_REF_TEXT_CHARS:
        raise ApiError(400, "invalid_request", f"ref_text is longer than {MAX_REF_TEXT_CHARS} characters")
    return canonical


async def reference_payload(services: Services, request: VoiceFromKeyRequest) -> VoiceGenerateV1:
    """Check a by-key request (key safe, under the allowed prefix, present) and build the job."""
    language = check_text_fields(services, text=request.text, ref_text=request.ref_text, language=request.language)
    try:
        key = check_reference_key(request.ref_audio_key, services.settings.voice_ref_prefix)
    except InvalidKeyError as exc:
        raise ApiError(400, "invalid_key", str(exc)) from None
    if not await services.store.exists(key):
        raise ApiError(404, "reference_not_found", f"no reference clip at {key!r}")
    return VoiceGenerateV1(ref_audio_key=key, ref_text=request.ref_text, text=request.text, language=language)


async def _respond_mp3(request: Request, services: Services, started: JobStart) -> Response[bytes | JobAccepted]:
    result = await finished_result(started)
    if result is None:
        return accepted(request, services, started.record)
    return Response(
        await output_bytes(services, started, result),
        media_type=MP3,
        headers={"X-Job-Id": started.record.job_id, "X-Audio-Duration": str(result["duration_seconds"])},
    )


async def _respond_streamed(
    request: Request, services: Services, started: JobStart, events: asyncio.Queue[StreamEvent]
) -> Response[Any]:
    """Wait for the job's first piece and stream from it; the reply first: its error, or the output whole (a job
    that finished without pieces: a redelivery already recorded); nothing in time: 202."""
    job_id, replies = started.record.job_id, services.replies
    seconds = services.settings.sync_timeout_seconds
    try:
        first = await next_event(events, seconds)
    except BaseException:
        replies.forget(job_id)
        raise
    if isinstance(first, ReplyPiece):
        body = stream_pieces(replies, job_id, events, first, seconds)
        return Stream(body, media_type=MP3, headers={"X-Job-Id": job_id})
    replies.forget(job_id)
    return await _respond_mp3(request, services, dataclasses.replace(started, reply=first))


def _check_stream_accept(request: Request) -> None:
    if not accepts(request.headers.get("Accept"), MP3):
        raise ApiError(
            406,
            "not_acceptable",
            "stream=true answers with audio/mpeg; send `Accept: audio/mpeg` (or no Accept header)",
        )


@post(
    "/v1/voice/generate",
    status_code=HTTP_200_OK,
    summary="Speak text in the voice of an uploaded clip; answers with MP3 bytes, whole or streamed as spoken "
    "(202 and a job past the timeout)",
    opt={**WRITE, **needs("voice")},
    responses={
        HTTP_200_OK: binary(
            MP3,
            "The MP3; X-Audio-Duration gives its length in seconds. With stream=true it is sent chunked as it is "
            "spoken, without X-Audio-Duration",
        ),
        **ACCEPTED,
        **errors(406, 408, 409, 410, 413, 422, 503),
    },
)
async def generate_voice(
    request: Request,
    services: Services,
    data: Annotated[VoiceCloneForm, Body(media_type=RequestEncodingType.MULTI_PART)],
    idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None,
    stream: Annotated[bool, STREAM] = False,
    callback_url: Annotated[str | None, CALLBACK_URL] = None,
) -> Response[Any]:
    settings = services.settings
    if stream:
        _check_stream_accept(request)
    callback = allowed_callback_url(services, callback_url)
    language = check_text_fields(services, text=data.text, ref_text=data.ref_text, language=data.language)
    clip = await data.ref_audio.read(settings.voice_max_ref_bytes + 1)
    await data.ref_audio.close()
    if len(clip) > settings.voice_max_ref_bytes:
        raise ApiError(
            413,
            "payload_too_large",
            f"ref_audio is larger than {settings.voice_max_ref_bytes} bytes (VOICE_MAX_REF_BYTES)",
        )
    await asyncio.to_thread(
        check_audio,
        clip,
        min_seconds=settings.voice_min_ref_seconds,
        max_seconds=settings.voice_max_ref_seconds,
    )
    payload = VoiceGenerateV1(ref_audio=clip, ref_text=data.ref_text, text=data.text, language=language)
    params = {
        "ref_audio": {"filename": data.ref_audio.filename, "size": len(clip)},
        "ref_text": data.ref_text,
        "text": data.text,
        "language": language,
    }
    if idempotency_key is not None:  # the same key with another clip of the same name and size is another request
        params["sha256"] = hashlib.sha256(clip).hexdigest()
    started = await start_job(
        services,
        job_type=VOICE_GENERATE,
        payload=payload,
        wait=True,
        params=params,
        idempotency_key=idempotency_key,
        stream=stream,
        callback_url=callback,
        request=request,
    )
    if started.events is not None:
        return await _respond_streamed(request, services, started, started.events)
    return await _respond_mp3(request, services, started)


@post(
    "/v1/r2/voice/generate",
    status_code=HTTP_200_OK,
    summary="Speak text in the voice of a clip stored in R2; the MP3 goes to R2 and its key comes back",
    opt={**WRITE, **needs("voice", "r2", instead="POST /v1/voice/generate")},
    responses={**ACCEPTED, **errors(404, 408, 409, 410, 413, 422, 503)},
)
async def generate_voice_to_r2(
    request: Request,
    services: Services,
    data: VoiceFromKeyRequest,
    idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None,
    callback_url: Annotated[str | None, CALLBACK_URL] = None,
) -> Response[GeneratedVoiceKey | JobAccepted]:
    callback = allowed_callback_url(services, callback_url)
    data = await strict_json(request, VoiceFromKeyRequest)
    payload = await reference_payload(services, data)
    started = await start_job(
        services,
        job_type=VOICE_GENERATE,
        payload=payload,
        wait=True,
        idempotency_key=idempotency_key,
        callback_url=callback,
        request=request,
    )
    result = await finished_result(started)
    if result is None:
        return accepted(request, services, started.record)
    return Response(
        GeneratedVoiceKey(key=result["key"], job_id=started.record.job_id, duration_seconds=result["duration_seconds"])
    )
