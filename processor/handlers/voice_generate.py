"""voice.generate: clone the reference voice, speak the text (split at sentences), store the MP3 as
voice/generated/<job id>.mp3."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from contract.audio import SAMPLE_RATE, InvalidAudioError, decode_audio, encode_mp3
from contract.messages import VOICE_GENERATE, VoiceGenerateV1, canonical_language, check_reference_key
from infra.settings import Settings
from infra.storage import InvalidKeyError, ObjectNotFoundError, ObjectStore
from models.voice import VoiceCloner
from processor.handlers.base import Job
from processor.outcomes import Failed, Outcome, Succeeded
from processor.outputs import store_once
from processor.retrying import TRANSIENT_ERRORS, retry_transient
from processor.text_chunks import split_text

log = structlog.get_logger(__name__)

GENERATED_PREFIX = "voice/generated/"


def generated_key(job_id: str) -> str:
    return f"{GENERATED_PREFIX}{job_id}.mp3"


class VoiceGenerateHandler:
    message_type = VOICE_GENERATE
    batch_size = 1
    always_record = True
    reports_running = True
    pipelined = False

    def __init__(self, *, store: ObjectStore, cloner: VoiceCloner, settings: Settings) -> None:
        self._store = store
        self._cloner = cloner
        self._settings = settings

    async def handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        return [await self._one(job) for job in jobs]

    async def _reference_bytes(self, payload: VoiceGenerateV1) -> bytes:
        if payload.ref_audio is not None:
            return payload.ref_audio
        key = check_reference_key(payload.ref_audio_key or "", self._settings.voice_ref_prefix)
        return (await retry_transient(lambda: self._store.get(key))).data

    async def _one(self, job: Job) -> Outcome:
        payload: VoiceGenerateV1 = job.payload
        settings = self._settings
        if len(payload.text) > settings.voice_max_text_chars:
            return Failed(
                "text_too_long",
                f"text is longer than {settings.voice_max_text_chars} characters (VOICE_MAX_TEXT_CHARS)",
            )
        try:
            data = await self._reference_bytes(payload)
        except InvalidKeyError as exc:
            return Failed("invalid_key", str(exc))
        except ObjectNotFoundError:
            return Failed("reference_not_found", f"no reference clip at {payload.ref_audio_key!r}")
        except TRANSIENT_ERRORS as exc:
            return Failed("storage_unavailable", str(exc), transient=True)
        if len(data) > settings.voice_max_ref_bytes:
            return Failed(
                "audio_too_large",
                f"the reference clip is larger than {settings.voice_max_ref_bytes} bytes (VOICE_MAX_REF_BYTES)",
            )
        try:
            reference = await asyncio.to_thread(
                decode_audio,
                data,
                sample_rate=SAMPLE_RATE,
                min_seconds=settings.voice_min_ref_seconds,
                max_seconds=settings.voice_max_ref_seconds,
            )
        except InvalidAudioError as exc:
            return Failed(exc.code, exc.message)
        language = canonical_language(payload.language) or "auto"
        pieces = split_text(payload.text, settings.voice_chunk_chars)
        wave = await asyncio.to_thread(
            self._cloner.clone, reference=reference, ref_text=payload.ref_text, pieces=pieces, language=language
        )
        mp3 = await asyncio.to_thread(encode_mp3, wave, SAMPLE_RATE, settings.voice_mp3_bitrate_kbps * 1000)
        key = generated_key(job.message_id)
        try:
            mp3 = await store_once(self._store, key, mp3, "audio/mpeg")
        except TRANSIENT_ERRORS as exc:
            return Failed("storage_unavailable", str(exc), transient=True)
        seconds = round(len(wave) / SAMPLE_RATE, 3)
        log.info(
            "voice_generated",
            job_id=job.message_id,
            key=key,
            seconds=seconds,
            pieces=len(pieces),
            language=language,
            reference_format=reference.source_format,
        )
        result = {
            "key": key,
            "content_type": "audio/mpeg",
            "size": len(mp3),
            "duration_seconds": seconds,
            "sample_rate": SAMPLE_RATE,
            "bitrate_kbps": settings.voice_mp3_bitrate_kbps,
            "language": language,
            "pieces": len(pieces),
            "model": self._cloner.model_id,
        }
        return Succeeded(result, attachment=mp3)
