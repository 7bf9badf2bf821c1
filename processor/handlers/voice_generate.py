"""voice.generate: clone the reference voice, speak the text (split at sentences), store the MP3 as
voice/generated/<job id>.mp3. A requester that asked for it streamed gets the MP3 sentence by sentence on its reply
queue as it is spoken; the stored object is those pieces joined."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

import numpy as np
import structlog

from contract.audio import SAMPLE_RATE, DecodedAudio, InvalidAudioError, decode_audio
from contract.messages import VOICE_GENERATE, VoiceGenerateV1, canonical_language, check_reference_key, output_key
from contract.mp3 import Mp3File, Mp3Stream, mp3_seconds
from infra.settings import Settings
from infra.storage import InvalidKeyError, ObjectNotFoundError, ObjectStore, ObjectTooLargeError
from models.voice import VoiceCloner
from processor.handlers.base import Job, PieceSink
from processor.outcomes import Failed, Outcome, Succeeded
from processor.outputs import StoredOutput, keyed_output, store_output
from processor.retrying import TRANSIENT_ERRORS, retry_transient
from processor.text_chunks import split_sentences, split_text

log = structlog.get_logger(__name__)


# a spoken piece is encoded and sent in slices of this many samples, so its first bytes leave after a slice's
# encoding (under a millisecond) rather than the whole piece's (about 3 ms per second of speech on a CPU core)
ENCODE_SLICE_SAMPLES = SAMPLE_RATE // 10


def encode_in_slices(encoder: Mp3Stream, samples: np.ndarray, hand_over: Callable[[bytes], None]) -> None:
    """Push `samples` through the encoder a slice at a time, handing over each slice's MP3 bytes at once."""
    for start in range(0, len(samples), ENCODE_SLICE_SAMPLES):
        hand_over(encoder.push(samples[start : start + ENCODE_SLICE_SAMPLES]))


@contextmanager
def encoding_beside(
    encode: Callable[[np.ndarray], None], encoder_thread: ThreadPoolExecutor
) -> Iterator[Callable[[np.ndarray], None]]:
    """An `on_piece` for the model's thread that hands each spoken piece to `encode` in `encoder_thread` (one
    worker: in order), so the model goes on to the next while it is encoded; leaving the block waits for every
    piece to be encoded (and raises the first encoding failure)."""
    pending: list[Future[None]] = []
    try:
        yield lambda part: pending.append(encoder_thread.submit(encode, part))
    finally:
        wait(pending)
    for encoded in pending:
        encoded.result()


class VoiceGenerateHandler:
    message_type = VOICE_GENERATE
    batch_size = 1
    always_record = True
    pipelined = False
    apart = False

    def __init__(self, *, store: ObjectStore, cloner: VoiceCloner, settings: Settings) -> None:
        self._store = store
        self._cloner = cloner
        self._settings = settings
        # a whole answer's MP3 is encoded here while the model speaks (one answer at a time: batch_size 1)
        self._encoder_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mp3-encode")

    def outputs(self, result: Mapping[str, Any]) -> tuple[str, ...]:
        return keyed_output(result)

    async def handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        return [await self._one(job) for job in jobs]

    async def _reference_bytes(self, payload: VoiceGenerateV1) -> bytes:
        if payload.ref_audio is not None:
            return payload.ref_audio
        key = check_reference_key(payload.ref_audio_key or "", self._settings.voice_ref_prefix)
        limit = self._settings.voice_max_ref_bytes
        return (await retry_transient(lambda: self._store.get(key, max_bytes=limit))).data

    async def _one(self, job: Job) -> Outcome:
        payload: VoiceGenerateV1 = job.payload
        settings = self._settings
        if len(payload.text) > settings.voice_max_text_chars:
            return Failed(
                "text_too_long",
                f"text is longer than {settings.voice_max_text_chars} characters (VOICE_MAX_TEXT_CHARS)",
            )
        if job.pieces is not None:
            try:
                stored = await self._stored(output_key(VOICE_GENERATE, job.message_id))
            except TRANSIENT_ERRORS as exc:
                return Failed("storage_unavailable", str(exc), transient=True)
            if stored is not None:
                return await self._resend(job, job.pieces, stored)
        reference = await self._reference(payload)
        if isinstance(reference, Failed):
            return reference
        if job.pieces is not None:
            return await self._streamed(job, job.pieces, reference)
        return await self._whole(job, reference)

    async def _reference(self, payload: VoiceGenerateV1) -> DecodedAudio | Failed:
        """The reference clip, read and decoded, or why it cannot be used."""
        settings = self._settings
        try:
            data = await self._reference_bytes(payload)
        except InvalidKeyError as exc:
            return Failed("invalid_key", str(exc))
        except ObjectNotFoundError:
            return Failed("reference_not_found", f"no reference clip at {payload.ref_audio_key!r}")
        except ObjectTooLargeError:
            return self._too_large()
        except TRANSIENT_ERRORS as exc:
            return Failed("storage_unavailable", str(exc), transient=True)
        if len(data) > settings.voice_max_ref_bytes:
            return self._too_large()
        try:
            return await asyncio.to_thread(
                decode_audio,
                data,
                sample_rate=SAMPLE_RATE,
                min_seconds=settings.voice_min_ref_seconds,
                max_seconds=settings.voice_max_ref_seconds,
            )
        except InvalidAudioError as exc:
            return Failed(exc.code, exc.message)

    async def _whole(self, job: Job, reference: DecodedAudio) -> Outcome:
        """Speak the text in batches, encode it as it is spoken, store it; the MP3 rides on the reply."""
        payload: VoiceGenerateV1 = job.payload
        language = canonical_language(payload.language) or "auto"
        pieces = split_text(payload.text, self._settings.voice_chunk_chars)
        mp3, samples = await asyncio.to_thread(self._speak_whole, reference, payload.ref_text, pieces, language)
        key = output_key(VOICE_GENERATE, job.message_id)
        stored = await store_output(job, self._store, key, mp3, "audio/mpeg")
        if not isinstance(stored, StoredOutput):
            return stored
        mp3 = stored.data
        seconds = round(samples / SAMPLE_RATE, 3)
        self._log(job, key, seconds, len(pieces), language, reference)
        result = self._result(key, mp3, seconds, len(pieces), language)
        return Succeeded(result, attachment=mp3, unflushed=(key,), created=stored.created)

    def _speak_whole(
        self, reference: DecodedAudio, ref_text: str, pieces: list[str], language: str
    ) -> tuple[bytes, int]:
        """In a worker thread: the model speaks the pieces a batch per call, and a second thread encodes each
        batch's audio while the model speaks the next, so only the last batch's encoding follows the model.
        Returns the whole MP3 file (encode_mp3's bytes for the joined waveform) and its sample count."""
        encoder = Mp3File(SAMPLE_RATE, self._bitrate)
        with encoding_beside(encoder.write, self._encoder_thread) as on_piece:
            wave = self._cloner.clone(
                reference=reference, ref_text=ref_text, pieces=pieces, language=language, on_piece=on_piece
            )
        return encoder.finish(), len(wave)

    async def _streamed(self, job: Job, sink: PieceSink, reference: DecodedAudio) -> Outcome:
        """Speak the text sentence by sentence, each sent as MP3 as soon as it is spoken, then store the whole;
        the reply carries no attachment (the pieces had the bytes)."""
        payload: VoiceGenerateV1 = job.payload
        language = canonical_language(payload.language) or "auto"
        pieces = split_sentences(payload.text, self._settings.voice_chunk_chars)
        mp3, samples = await self._speak_streamed(sink, reference, payload.ref_text, pieces, language)
        key = output_key(VOICE_GENERATE, job.message_id)
        stored = await store_output(job, self._store, key, mp3, "audio/mpeg")
        if not isinstance(stored, StoredOutput):
            return stored
        if stored.data != mp3:
            log.warning("voice_stream_differs_from_stored", job_id=job.message_id, key=key)
        seconds = round(samples / SAMPLE_RATE, 3)
        self._log(job, key, seconds, len(pieces), language, reference)
        result = self._result(key, stored.data, seconds, len(pieces), language)
        return Succeeded(result, unflushed=(key,), created=stored.created)

    async def _speak_streamed(
        self, sink: PieceSink, reference: DecodedAudio, ref_text: str, pieces: list[str], language: str
    ) -> tuple[bytes, int]:
        """Run the model in a worker thread that encodes each spoken piece there and hands the MP3 bytes to this
        loop, which sends them on while the model speaks the next. Returns the whole MP3 and its sample count.
        (Encoding in a second thread, as a whole answer does, made the first byte later on a 2-core CPU: the
        encoder and the model share the cores, and the first piece's bytes wait for a thread hand-off.)"""
        loop = asyncio.get_running_loop()
        encoded: asyncio.Queue[bytes | None] = asyncio.Queue()
        encoder = Mp3Stream(SAMPLE_RATE, self._bitrate)

        def hand_over(data: bytes | None) -> None:
            loop.call_soon_threadsafe(encoded.put_nowait, data)

        def speak() -> int:
            try:
                wave = self._cloner.clone(
                    reference=reference,
                    ref_text=ref_text,
                    pieces=pieces,
                    language=language,
                    on_piece=lambda part: encode_in_slices(encoder, part, hand_over),
                    one_by_one=True,
                )
                hand_over(encoder.finish())
                return len(wave)
            finally:
                hand_over(None)

        speaking = asyncio.ensure_future(asyncio.to_thread(speak))
        sent: list[bytes] = []
        while (data := await encoded.get()) is not None:
            if data:
                sent.append(data)
                await sink.send(data)
        return b"".join(sent), await speaking

    async def _stored(self, key: str) -> bytes | None:
        """The output an earlier delivery of this job stored, if there is one (an empty object is none: what a
        power failure can leave of an output not yet flushed)."""
        try:
            return (await retry_transient(lambda: self._store.get(key))).data or None
        except ObjectNotFoundError:
            return None

    async def _resend(self, job: Job, sink: PieceSink, stored: bytes) -> Outcome:
        """A redelivery after the output was stored: stream the stored MP3 as one piece, and succeed with it. Its
        duration is measured from the MP3 (the waveform is gone), LAME's delay and padding included."""
        payload: VoiceGenerateV1 = job.payload
        key = output_key(VOICE_GENERATE, job.message_id)
        log.info("output_already_stored", key=key)
        await sink.send(stored)
        seconds = round(await asyncio.to_thread(mp3_seconds, stored), 3)
        pieces = split_sentences(payload.text, self._settings.voice_chunk_chars)
        language = canonical_language(payload.language) or "auto"
        return Succeeded(self._result(key, stored, seconds, len(pieces), language), unflushed=(key,))

    def _too_large(self) -> Failed:
        limit = self._settings.voice_max_ref_bytes
        return Failed("audio_too_large", f"the reference clip is larger than {limit} bytes (VOICE_MAX_REF_BYTES)")

    @property
    def _bitrate(self) -> int:
        return self._settings.voice_mp3_bitrate_kbps * 1000

    def _result(self, key: str, mp3: bytes, seconds: float, pieces: int, language: str) -> dict[str, Any]:
        return {
            "key": key,
            "content_type": "audio/mpeg",
            "size": len(mp3),
            "duration_seconds": seconds,
            "sample_rate": SAMPLE_RATE,
            "bitrate_kbps": self._settings.voice_mp3_bitrate_kbps,
            "language": language,
            "pieces": pieces,
            "model": self._cloner.model_id,
        }

    @staticmethod
    def _log(job: Job, key: str, seconds: float, pieces: int, language: str, reference: DecodedAudio) -> None:
        log.info(
            "voice_generated",
            job_id=job.message_id,
            key=key,
            seconds=seconds,
            pieces=pieces,
            language=language,
            reference_format=reference.source_format,
            streamed=job.pieces is not None,
        )
