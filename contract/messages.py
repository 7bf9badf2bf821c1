"""The message contract: what travels on the ams.jobs exchange.

Each job type is a versioned msgspec Struct. The AMQP `type` property names the job type (it is also the
routing key), `message_id` identifies the job, and `content_type` says how the body is encoded:
`application/json` (binary fields as base64) or `application/msgpack` (what the API itself publishes).
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

import msgspec

from contract.callbacks import JOB_CALLBACK, JobCallbackV1
from contract.errors import ErrorInfo
from contract.job_types import IMAGE_DELETE, IMAGE_EMBED, IMAGE_GENERATE, IMAGE_INDEX, VOICE_GENERATE
from contract.jobs import GENERATED_IMAGES, GENERATED_VOICES
from infra.settings import Settings
from infra.storage import InvalidKeyError, validate_key

JSON = "application/json"
MSGPACK = "application/msgpack"
CONTENT_TYPES = (JSON, MSGPACK)

# the languages Qwen3-TTS speaks, by the names its API takes; "auto" lets the model decide
VOICE_LANGUAGES = (
    "Korean",
    "English",
    "Chinese",
    "Japanese",
    "German",
    "French",
    "Russian",
    "Portuguese",
    "Spanish",
    "Italian",
    "auto",
)

MAX_SEED = 2**64 - 1

# the end of the text as both Python's re (msgspec checks a `pattern` with re.search, whose `$` also matches before a
# final "\n") and JSON Schema's ECMAScript regexes read it: a pattern anchored with END takes no trailing newline
END = r"(?!\n)$"

UUID_PATTERN = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}" + END
MAX_FILENAME_CHARS = 255  # an uploaded image's file name, as kept in its record

ImageId = Annotated[str, msgspec.Meta(pattern=UUID_PATTERN, description="a UUID")]
Source = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+" + END)]


class ImageIndexV1(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Index one image: embed it and make it searchable.

    Give the image either inline (`data`, base64 in JSON) or as `key`, an object already in storage, which
    is then indexed in place. Without `image_id`, the message id is used (it must then be a UUID).
    """

    version: Literal[1] = 1
    image_id: ImageId | None = None
    data: bytes | None = None
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None
    filename: Annotated[str, msgspec.Meta(max_length=MAX_FILENAME_CHARS)] | None = None
    source: Source = "upstream"

    def __post_init__(self) -> None:
        if (self.data is None) == (self.key is None):
            raise ValueError("give exactly one of `data` (the image bytes) or `key` (an object in storage)")


class ImageDeleteV1(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Remove one image from the index.

    By `image_id`: the point, the stored original and the thumbnail go, as with DELETE /v1/images/{id}. By `key`:
    the point and the thumbnail of the object indexed in place at that key go (its id derives from bucket and key);
    the object itself is left alone. Deleting an image that is not indexed succeeds (nothing to do).
    """

    version: Literal[1] = 1
    image_id: ImageId | None = None
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None

    def __post_init__(self) -> None:
        if (self.image_id is None) == (self.key is None):
            raise ValueError("give exactly one of `image_id` or `key`")


class ImageEmbedV1(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Embed one image with the index's CLIP model and reply with its vector; nothing is stored.

    A request/reply message: send it with `reply_to` and `correlation_id`; the reply's `attachment` is the
    L2-normalised vector as little-endian float32 and its `result` names the model and the dimension. The
    API uses it for search by image when it holds only the CLIP text tower (an API-only process).
    """

    version: Literal[1] = 1
    data: bytes


MAX_REF_TEXT_CHARS = 2000

# a character that neither Python (str.isspace: also \x1c-\x1f and \x85) nor JSON Schema's ECMAScript regexes
# (\s: also \ufeff) count as a space, in a pattern both engines read the same; the OpenAPI document states it
NON_BLANK = r"[^\s\x1c-\x1f\x85\ufeff]"
_NON_BLANK = re.compile(NON_BLANK)


def is_blank(text: str) -> bool:
    """Whether `text` has nothing in it but spaces, by either Python's or JSON Schema's idea of a space."""
    return _NON_BLANK.search(text) is None


Prompt = Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
Side = Annotated[int, msgspec.Meta(ge=64, le=2048, multiple_of=16, description="pixels, a multiple of 16")]


def check_generation_fields(prompt: str, seed: int | None) -> None:
    """The checks msgspec constraints cannot express (seeds span the unsigned 64-bit range)."""
    if is_blank(prompt):
        raise ValueError("prompt must contain at least one non-space character")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}")


class ImageGenerateFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Text-to-image parameters; unset ones take the server's defaults (IMAGE_DEFAULT_*). Shared by the
    image.generate message and the HTTP request bodies that start one."""

    prompt: Prompt
    seed: Annotated[int, msgspec.Meta(description=f"0..{MAX_SEED}; absent: drawn at random, reported back")] | None = (
        None
    )
    negative_prompt: Annotated[str, msgspec.Meta(max_length=2000)] | None = None
    width: Side | None = None
    height: Side | None = None
    steps: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    guidance_scale: Annotated[float, msgspec.Meta(ge=0.0, le=30.0)] | None = None

    def __post_init__(self) -> None:
        check_generation_fields(self.prompt, self.seed)


def check_generation_budget(fields: ImageGenerateFields, settings: Settings) -> None:
    """ContractError `too_expensive` when width x height x steps (the server's defaults for what is unset) is over
    IMAGE_MAX_PIXEL_STEPS: a generation's time grows with it, and one job holds its processor for that long."""
    width = fields.width or settings.image_default_width
    height = fields.height or settings.image_default_height
    steps = fields.steps or settings.image_default_steps
    cost = width * height * steps
    if cost > settings.image_max_pixel_steps:
        raise ContractError(
            "too_expensive",
            f"{width}x{height} at {steps} steps is {cost:,} pixel-steps, over this server's budget of "
            f"{settings.image_max_pixel_steps:,} (IMAGE_MAX_PIXEL_STEPS); ask for fewer pixels or steps",
        )


class ImageGenerateV1(ImageGenerateFields, kw_only=True, forbid_unknown_fields=True):
    """Generate one image from a prompt; the PNG is stored as images/generated/<job id>.png.

    Unset fields take the server's defaults (IMAGE_DEFAULT_*); an unset seed is derived from the job id, so a
    job is fully determined by its message.
    """

    version: Literal[1] = 1


def canonical_language(value: str) -> str | None:
    """The model's name for a language given in any case, or None if it is not one of VOICE_LANGUAGES."""
    wanted = value.strip().lower()
    return next((name for name in VOICE_LANGUAGES if name.lower() == wanted), None)


def check_voice_fields(text: str, ref_text: str, language: str) -> None:
    if is_blank(text):
        raise ValueError("text must contain at least one non-space character")
    if is_blank(ref_text):
        raise ValueError("ref_text (the transcript of the reference clip) must not be empty")
    if canonical_language(language) is None:
        raise ValueError(f"language {language!r} is not supported; use one of {', '.join(VOICE_LANGUAGES)}")


class VoiceGenerateV1(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Speak `text` in the voice of a reference clip; the MP3 is stored as voice/generated/<job id>.mp3.

    Give the reference either inline (`ref_audio`, base64 in JSON) or as `ref_audio_key`, an object under the
    server's allowed prefix (VOICE_REF_PREFIX). `ref_text` is the transcript of the reference clip.
    """

    version: Literal[1] = 1
    ref_audio: bytes | None = None
    ref_audio_key: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None
    ref_text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REF_TEXT_CHARS)]
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=100_000)]
    language: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]

    def __post_init__(self) -> None:
        if (self.ref_audio is None) == (self.ref_audio_key is None):
            raise ValueError("give exactly one of `ref_audio` (the clip) or `ref_audio_key` (an object in storage)")
        check_voice_fields(self.text, self.ref_text, self.language)


JOB_TYPES: dict[str, type[msgspec.Struct]] = {
    IMAGE_INDEX: ImageIndexV1,
    IMAGE_GENERATE: ImageGenerateV1,
    VOICE_GENERATE: VoiceGenerateV1,
    IMAGE_DELETE: ImageDeleteV1,
    IMAGE_EMBED: ImageEmbedV1,
    JOB_CALLBACK: JobCallbackV1,
}

# where a generation stores its output, named by its job id
_OUTPUT_KEYS = {IMAGE_GENERATE: f"{GENERATED_IMAGES}{{}}.png", VOICE_GENERATE: f"{GENERATED_VOICES}{{}}.mp3"}


def output_key(job_type: str, job_id: str) -> str | None:
    """The key a generation of this job id stores its output under; None for a job type that stores none."""
    template = _OUTPUT_KEYS.get(job_type)
    return None if template is None else template.format(job_id)


class ContractError(ValueError):
    """The message breaks the contract; it can never succeed as sent (dead-lettered at once)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# A requester that sets this header (true) on a job message with reply_to and correlation_id asks for the
# output in pieces as it is made (voice.generate: the MP3, sentence by sentence). Each piece is a message to
# reply_to with the same correlation_id, AMQP type infra.broker.REPLY_PIECE, header infra.broker.OFFSET_HEADER
# (the piece's byte offset in the output) and the raw bytes as body, not persistent; pieces come in order, and
# the JobReply ends the stream (without attachment: the pieces carried the bytes). A retried or redelivered job
# starts again at offset 0. A handler that cannot stream ignores the header and replies as usual.
STREAM_HEADER = "x-ams-stream"


class JobReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the processor sends back to a requester waiting on reply_to (matched by correlation id)."""

    job_id: str
    status: Literal["succeeded", "failed"]
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    attachment: bytes | None = None


def normalise_uuid(value: str) -> str:
    return str(uuid.UUID(value))


def encode(payload: msgspec.Struct, content_type: str = MSGPACK) -> bytes:
    if content_type == MSGPACK:
        return msgspec.msgpack.encode(payload)
    return msgspec.json.encode(payload)


def decode_job(message_type: str | None, content_type: str | None, body: bytes) -> msgspec.Struct:
    """Decode and validate a job body, or raise ContractError naming what is wrong."""
    if not message_type:
        raise ContractError("missing_type", "the AMQP `type` property is required (the job type)")
    struct = JOB_TYPES.get(message_type)
    if struct is None:
        raise ContractError(
            "unknown_type", f"unknown job type {message_type!r}; known types: {', '.join(sorted(JOB_TYPES))}"
        )
    kind = (content_type or JSON).split(";")[0].strip().lower()
    try:
        if kind == MSGPACK:
            return msgspec.msgpack.decode(body, type=struct)
        if kind == JSON:
            return msgspec.json.decode(body, type=struct)
    except msgspec.ValidationError as exc:
        raise ContractError("schema_violation", f"{message_type} body is invalid: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ContractError("malformed_body", f"{message_type} body is not valid {kind}: {exc}") from None
    except (RecursionError, UnicodeDecodeError) as exc:
        raise ContractError("malformed_body", f"{message_type} body is not valid {kind}: {undecodable(exc)}") from None
    raise ContractError(
        "unsupported_content_type",
        f"content_type {content_type!r} is not supported; use {' or '.join(CONTENT_TYPES)}",
    )


def undecodable(exc: RecursionError | UnicodeDecodeError) -> str:
    """What msgspec's errors outside DecodeError say: nesting too deep for the decoder, or a string not UTF-8."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return f"a string is not valid UTF-8 ({exc.reason} at byte {exc.start})"


def check_reference_key(key: str, prefix: str) -> str:
    """The key if it is safe and under the allowed prefix; InvalidKeyError otherwise."""
    validate_key(key)
    if not key.startswith(prefix):
        raise InvalidKeyError(f"ref_audio_key must be under {prefix!r} (VOICE_REF_PREFIX); got {key!r}")
    return key
