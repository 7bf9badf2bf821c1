"""Wire types of the HTTP API (msgspec Structs; multipart forms are dataclasses, as Litestar expects)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from litestar.datastructures import UploadFile

from api.filters import SearchFilter
from contract.callbacks import CallbackUrl
from contract.jobs import OutputDeleted
from contract.messages import IMAGE_GENERATE, MAX_REF_TEXT_CHARS, VOICE_GENERATE, VOICE_LANGUAGES, ImageGenerateFields


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
    thumbnail_url: Annotated[
        str, msgspec.Meta(description="redirects to a short-lived URL of the thumbnail (WebP, THUMBNAIL_MAX_SIDE)")
    ]


class JobAccepted(msgspec.Struct, kw_only=True):
    """A job was queued; poll `status_url` until its result is there."""

    job_id: str
    status: str
    status_url: str


class GenerateImageRequest(ImageGenerateFields, kw_only=True, forbid_unknown_fields=True):
    """Text-to-image parameters; unset ones take the server's defaults (IMAGE_DEFAULT_*)."""


class GeneratedImageKey(msgspec.Struct, kw_only=True):
    key: str
    job_id: str
    seed: int


class JobError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class CallbackOut(msgspec.Struct, kw_only=True):
    """What became of the callback of a job's end (README, Callbacks): pending (the job has not ended, or its
    callback has not been tried yet), delivered, retrying (it failed and is tried again later) or failed (not
    delivered: dead-lettered for an operator); `answer`: what the receiver answered, or why it was not sent."""

    state: Literal["pending", "delivered", "retrying", "failed"]
    attempts: int
    answer: str | None = None
    at: str | None = None


class JobOut(msgspec.Struct, kw_only=True):
    job_id: str
    type: str
    status: Literal["queued", "running", "succeeded", "failed"]
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    attempts: int
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: JobError | None
    last_error: JobError | None
    callback_url: str | None = None
    callback: CallbackOut | None = None
    output_deleted: Annotated[
        OutputDeleted | None,
        msgspec.Meta(
            description="the generated output the result names is gone (its result then has no download url): "
            "when, and why: expired (OUTPUT_TTL_DAYS after the job finished) or deleted (DELETE /v1/jobs/{id}/output)"
        ),
    ] = None
    output_expires_at: Annotated[
        str | None,
        msgspec.Meta(
            description="when the generated output the result names comes due for deletion: OUTPUT_TTL_DAYS after "
            "the job finished (a processor's hourly sweep deletes it within the hour after); null when this server "
            "keeps outputs, or the output is gone"
        ),
    ] = None
    status_url: str


class SearchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    query: Annotated[str, msgspec.Meta(min_length=1, max_length=1000, description="text in any language")]
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    filter: SearchFilter | None = None


class SearchHit(msgspec.Struct, kw_only=True):
    id: str
    score: Annotated[float, msgspec.Meta(description="cosine similarity, higher is closer")]
    r2_key: str
    file_url: str
    thumbnail_url: str
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


@dataclass
class VoiceCloneForm:
    """Multipart fields of POST /v1/voice/generate."""

    ref_audio: UploadFile
    ref_text: str
    text: str
    language: str


class VoiceFromKeyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Voice cloning with a reference clip already in storage (under VOICE_REF_PREFIX)."""

    ref_audio_key: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=1024,
            description="an object key under VOICE_REF_PREFIX, at most 1024 bytes in UTF-8 (R2's limit; longer is "
            "a 400 invalid_key, as is a key with empty, '.' or '..' segments)",
            examples=["voice/refs/ref.mp3"],
        ),
    ]
    ref_text: Annotated[
        str, msgspec.Meta(min_length=1, max_length=MAX_REF_TEXT_CHARS, description="transcript of the clip")
    ]
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=100_000, description="what to say")]
    language: Annotated[str, msgspec.Meta(description=f"one of {', '.join(VOICE_LANGUAGES)} (any case)")]


class GeneratedVoiceKey(msgspec.Struct, kw_only=True):
    key: str
    job_id: str
    duration_seconds: float


class JobKind(msgspec.Struct):
    """The part of a POST /v1/jobs body read first, to name an unknown job type before the rest is checked."""

    type: str


class _JobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What every job may ask for: `callback_url`, where its end is POSTed (README, Callbacks)."""

    callback_url: CallbackUrl | None = None


class ImageJobRequest(_JobRequest, kw_only=True, forbid_unknown_fields=True, tag_field="type", tag=IMAGE_GENERATE):
    """An image.generate job: the parameters of POST /v1/images/generate."""

    params: GenerateImageRequest


class VoiceJobRequest(_JobRequest, kw_only=True, forbid_unknown_fields=True, tag_field="type", tag=VOICE_GENERATE):
    """A voice.generate job: the parameters of POST /v1/r2/voice/generate (a reference clip already stored)."""

    params: VoiceFromKeyRequest


JobRequest = ImageJobRequest | VoiceJobRequest
