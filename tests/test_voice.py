"""Voice cloning through the queue: the seed's two endpoints, the voice.generate job, every accepted reference
format, and the bad input they refuse."""

from __future__ import annotations

import threading
import uuid

import httpx
import numpy as np
import pytest
import torch

from contract import audio
from contract.audio import SAMPLE_RATE
from contract.messages import VOICE_GENERATE, VOICE_LANGUAGES, VoiceGenerateV1
from contract.mp3 import Mp3File, encode_mp3
from infra.storage.factory import open_store
from models.voice import VoiceCloner
from processor.handlers.base import Job
from processor.handlers.voice_generate import VoiceGenerateHandler
from processor.outcomes import Succeeded
from processor.text_chunks import split_text
from tests.support.audio import CLIP_FORMATS, mp3_info, speech_clip, tone_wav
from tests.support.images import encoded
from tests.support.server import running_server
from tests.test_generation import poll_statuses

REF_TEXT = "Hello there. This is the reference voice, speaking clearly for a few seconds."
PARAGRAPH = " ".join(
    [
        "The meeting that was planned for half past ten has moved to the afternoon, right after lunch.",
        "Please bring the quarterly figures, the draft of the new contract, and the notes from last week.",
        "If anything is unclear, call the front desk and ask for the project lead before you set out.",
        "We will also look at the travel plans for next month, so check your calendars in advance.",
        "Thank you, and see you there!",
    ]
)


@pytest.fixture(scope="module")
async def server(make_settings, s3):
    bucket = s3.new_bucket()
    settings = make_settings(r2_bucket=bucket, endpoint=s3.endpoint, VOICE_ENABLED="1")
    async with running_server(settings) as running:
        running.bucket = bucket
        yield running


def form(clip: bytes, filename: str = "ref.mp3", **fields: str) -> dict:
    data = {"ref_text": REF_TEXT, "text": "Good morning, how are you today?", "language": "English", **fields}
    return {"files": {"ref_audio": (filename, clip, "application/octet-stream")}, "data": data}


def put_reference(s3, bucket: str, key: str, data: bytes) -> None:
    s3.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType="audio/mpeg")


async def test_readiness_includes_the_voice_model(server):
    ready = await server.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["voice_model"] == "ok"


@pytest.mark.parametrize("fmt", CLIP_FORMATS)
async def test_every_reference_format_gives_mp3(server, fmt):
    response = await server.client.post("/v1/voice/generate", **form(speech_clip(fmt), filename=f"ref.{fmt}"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/mpeg"
    uuid.UUID(response.headers["x-job-id"])
    seconds, rate = mp3_info(response.content)
    assert rate == SAMPLE_RATE
    assert seconds > 0
    assert abs(seconds - float(response.headers["x-audio-duration"])) < 0.06


async def test_only_the_processor_resamples_a_reference(server, monkeypatch):
    """The API checks a clip at its own rate before queueing the job; the processor resamples it for the model."""
    resample = audio.resample
    resampled: list[tuple[int, int]] = []

    def counted(waveform: np.ndarray, native_rate: int, rate: int) -> np.ndarray:
        resampled.append((native_rate, rate))
        return resample(waveform, native_rate, rate)

    monkeypatch.setattr(audio, "resample", counted)
    response = await server.client.post("/v1/voice/generate", **form(tone_wav(2, rate=44101), filename="ref.wav"))
    assert response.status_code == 200, response.text
    assert resampled == [(44101, SAMPLE_RATE)]  # an odd rate too (FFmpeg resamples any)


async def test_the_seed_example_in_korean(server):
    response = await server.client.post(
        "/v1/voice/generate",
        **form(
            speech_clip("mp3"),
            text="오전 10시 30분에 예정된 미팅 일정을 다시 한번 확인해 주시겠어요?",
            language="Korean",
        ),
    )
    assert response.status_code == 200, response.text
    assert mp3_info(response.content)[0] > 0


async def test_r2_variant_reads_the_reference_by_key_and_writes_one_object(server, s3):
    put_reference(s3, server.bucket, "voice/refs/ref.mp3", speech_clip("mp3"))
    before = set(s3.keys(server.bucket, "voice/generated/"))
    response = await server.client.post(
        "/v1/r2/voice/generate",
        json={
            "ref_audio_key": "voice/refs/ref.mp3",
            "ref_text": REF_TEXT,
            "text": "Stored, not streamed.",
            "language": "english",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["key"] == f"voice/generated/{body['job_id']}.mp3"
    assert set(s3.keys(server.bucket, "voice/generated/")) - before == {body["key"]}
    stored = s3.client.get_object(Bucket=server.bucket, Key=body["key"])
    assert stored["ContentType"] == "audio/mpeg"
    seconds, rate = mp3_info(stored["Body"].read())
    assert (rate, round(seconds, 1)) == (SAMPLE_RATE, round(body["duration_seconds"], 1))


async def test_async_job_splits_a_paragraph_and_joins_the_pieces(server, s3):
    put_reference(s3, server.bucket, "voice/refs/para.flac", speech_clip("flac"))
    response = await server.client.post(
        "/v1/jobs",
        json={
            "type": "voice.generate",
            "params": {
                "ref_audio_key": "voice/refs/para.flac",
                "ref_text": REF_TEXT,
                "text": PARAGRAPH,
                "language": "auto",
            },
        },
    )
    assert response.status_code == 202, response.text
    statuses, job = await poll_statuses(server, response.json()["status_url"])
    assert statuses[-1] == "succeeded", job
    result = job["result"]
    assert result["key"] == f"voice/generated/{job['job_id']}.mp3"
    assert len(PARAGRAPH) > 250
    assert result["pieces"] == len(split_text(PARAGRAPH, 250)) > 1
    assert result["sample_rate"] == SAMPLE_RATE
    async with httpx.AsyncClient() as plain:
        download = await plain.get(result["url"])
    seconds, _ = mp3_info(download.content)
    assert seconds == pytest.approx(result["duration_seconds"], abs=0.06)
    assert seconds > (result["pieces"] - 1) * 0.2  # the pieces and the pauses between them


async def test_sync_wait_past_the_timeout_answers_202_with_the_job(make_settings):
    async with running_server(make_settings(VOICE_ENABLED="1", SYNC_TIMEOUT_SECONDS="0.1")) as server:
        response = await server.client.post("/v1/voice/generate", **form(speech_clip("wav"), text=PARAGRAPH))
        assert response.status_code == 202, response.text
        _, job = await poll_statuses(server, response.json()["status_url"])
        assert job["status"] == "succeeded"
        download = await server.client.get(job["result"]["url"])
        assert mp3_info(download.content)[0] > 0


async def test_without_r2_the_bytes_endpoint_works_and_the_r2_one_says_why_not(make_settings):
    async with running_server(make_settings(VOICE_ENABLED="1")) as server:
        works = await server.client.post("/v1/voice/generate", **form(speech_clip("ogg-opus")))
        assert works.status_code == 200, works.text
        assert mp3_info(works.content)[0] > 0
        refused = await server.client.post(
            "/v1/r2/voice/generate",
            json={"ref_audio_key": "voice/refs/a.mp3", "ref_text": "x", "text": "y", "language": "English"},
        )
        assert refused.status_code == 503
        assert refused.json()["code"] == "r2_disabled"


async def test_voice_disabled(make_settings):
    async with running_server(make_settings(VOICE_ENABLED="0")) as server:
        assert server.processor is not None and server.processor.runtime.voice is None
        assert "voice_model" not in (await server.client.get("/readyz")).json()["checks"]
        by_key = {"ref_audio_key": "voice/refs/a.mp3", "ref_text": "x", "text": "y", "language": "English"}
        for response in (
            await server.client.post("/v1/voice/generate", **form(speech_clip("wav"))),
            await server.client.post("/v1/r2/voice/generate", json=by_key),
            await server.client.post("/v1/jobs", json={"type": "voice.generate", "params": by_key}),
        ):
            assert response.status_code == 503
            assert response.json()["code"] == "feature_disabled"
            assert "VOICE_ENABLED" in response.json()["message"]


def _without(field: str) -> dict:
    request = form(speech_clip("wav"))
    if field == "ref_audio":  # still multipart: the text fields as parts without a file name
        return {"files": {name: (None, value) for name, value in request["data"].items()}}
    request["data"].pop(field)
    return request


@pytest.mark.parametrize("field", ["ref_audio", "ref_text", "text", "language"])
async def test_missing_multipart_fields(server, field):
    response = await server.client.post("/v1/voice/generate", **_without(field))
    assert response.status_code == 400, response.text
    assert field in response.json()["message"]


async def test_a_body_that_is_not_multipart(server):
    response = await server.client.post("/v1/voice/generate", data={"text": "hi", "language": "English"})
    assert response.status_code == 400
    assert "multipart/form-data" in response.json()["message"]
    assert "application/x-www-form-urlencoded" in response.json()["message"]


async def test_a_transcript_that_is_not_utf8_is_a_400(server, s3):
    before = set(s3.keys(server.bucket, "voice/"))
    request = form(speech_clip("wav"))
    del request["data"]["ref_text"]
    request["files"]["ref_text"] = (None, "Bonjour".encode("latin-1") + b"\xe9", None)
    response = await server.client.post("/v1/voice/generate", **request)
    assert (response.status_code, response.json()["code"]) == (400, "invalid_request"), response.text
    assert "utf-8" in response.json()["message"]
    assert set(s3.keys(server.bucket, "voice/")) == before


@pytest.mark.parametrize(
    ("clip", "fields", "status", "code"),
    [
        (lambda: speech_clip("wav"), {"text": ""}, 400, "invalid_request"),
        (lambda: speech_clip("wav"), {"text": "   "}, 400, "invalid_request"),
        (lambda: speech_clip("wav"), {"text": "\x1d\ufeff"}, 400, "invalid_request"),
        (lambda: speech_clip("wav"), {"ref_text": " "}, 400, "invalid_request"),
        (lambda: speech_clip("wav"), {"text": "x" * 5001}, 400, "text_too_long"),
        (lambda: speech_clip("wav"), {"language": "Klingon"}, 422, "unsupported_language"),
        (lambda: b"these are the meeting notes, not a recording\n" * 50, {}, 422, "not_audio"),
        (lambda: encoded(1, "PNG"), {}, 422, "not_audio"),  # FFmpeg opens it, as an image sequence without sound
        (lambda: b"", {}, 422, "empty_file"),
        (lambda: tone_wav(0.1), {}, 422, "audio_too_short"),
        (lambda: tone_wav(31), {}, 422, "audio_too_long"),
        (lambda: speech_clip("mp3")[:3000], {}, 422, "audio_too_short"),
    ],
)
async def test_bad_multipart_requests(server, s3, clip, fields, status, code):
    before = set(s3.keys(server.bucket, "voice/"))
    response = await server.client.post("/v1/voice/generate", **form(clip(), **fields))
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    if code == "unsupported_language":
        assert body["details"]["accepted"] == list(VOICE_LANGUAGES)
        assert "Korean" in body["message"]
    assert set(s3.keys(server.bucket, "voice/")) == before


async def test_oversize_reference_is_413(server, s3):
    limit = server.services.settings.voice_max_ref_bytes
    before = set(s3.keys(server.bucket, "voice/"))
    response = await server.client.post("/v1/voice/generate", **form(b"\0" * (limit + 1)))
    assert response.status_code == 413, response.text
    assert "VOICE_MAX_REF_BYTES" in response.json()["message"]
    too_big_body = await server.client.post("/v1/voice/generate", **form(b"\0" * (limit + 2 * 1024 * 1024)))
    assert too_big_body.status_code == 413
    assert set(s3.keys(server.bucket, "voice/")) == before


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"ref_audio_key": "../secret"}, 400, "invalid_key"),
        ({"ref_audio_key": "voice/refs/../../secret"}, 400, "invalid_key"),
        ({"ref_audio_key": "/voice/refs/ref.mp3"}, 400, "invalid_key"),
        ({"ref_audio_key": "images/originals/private.png"}, 400, "invalid_key"),
        ({"ref_audio_key": "voice/refs/missing.mp3"}, 404, "reference_not_found"),
        ({"language": "Klingon"}, 422, "unsupported_language"),
        ({"text": ""}, 400, "invalid_request"),
        ({"ref_text": None}, 400, "invalid_request"),
        ({"text": 42}, 400, "invalid_request"),
        ({"speaker": "me"}, 400, "invalid_request"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/r2/voice/generate", "/v1/jobs"])
async def test_bad_by_key_requests(server, s3, path, body, status, code):
    put_reference(s3, server.bucket, "voice/refs/ref.mp3", speech_clip("mp3"))
    params = {"ref_audio_key": "voice/refs/ref.mp3", "ref_text": REF_TEXT, "text": "hi", "language": "English", **body}
    payload = {"type": "voice.generate", "params": params} if path == "/v1/jobs" else params
    before = set(s3.keys(server.bucket, "voice/generated/"))
    response = await server.client.post(path, json=payload)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert set(s3.keys(server.bucket, "voice/generated/")) == before


async def test_a_reference_in_storage_that_is_not_audio_fails_the_job(server, s3):
    put_reference(s3, server.bucket, "voice/refs/notes.mp3", b"not a recording at all\n" * 40)
    by_key = {"ref_audio_key": "voice/refs/notes.mp3", "ref_text": REF_TEXT, "text": "hi", "language": "English"}
    response = await server.client.post("/v1/r2/voice/generate", json=by_key)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "not_audio"
    queued = await server.client.post("/v1/jobs", json={"type": "voice.generate", "params": by_key})
    _, job = await poll_statuses(server, queued.json()["status_url"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "not_audio"


async def test_a_reference_in_storage_larger_than_the_limit_is_refused_unread(server, s3, monkeypatch):
    limit = server.services.settings.voice_max_ref_bytes
    put_reference(s3, server.bucket, "voice/refs/huge.mp3", speech_clip("mp3") + bytes(limit))
    store = server.processor.runtime.store
    read, real_get = [], store.get

    async def counted(key: str, **options: object) -> object:
        stored = await real_get(key, **options)
        read.append((key, len(stored.data)))
        return stored

    monkeypatch.setattr(store, "get", counted)
    by_key = {"ref_audio_key": "voice/refs/huge.mp3", "ref_text": REF_TEXT, "text": "hi", "language": "English"}
    response = await server.client.post("/v1/r2/voice/generate", json=by_key)
    assert ("voice/refs/huge.mp3", len(speech_clip("mp3")) + limit) not in read  # never read whole
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "audio_too_large"
    assert "VOICE_MAX_REF_BYTES" in response.json()["message"]


async def test_idempotency_key_on_the_voice_endpoints(server, s3):
    key = f"voice-{uuid.uuid4()}"
    request = form(speech_clip("wav"), text="Only once, please.")
    first = await server.client.post("/v1/voice/generate", **request, headers={"Idempotency-Key": key})
    again = await server.client.post("/v1/voice/generate", **request, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 200
    assert first.headers["x-job-id"] == again.headers["x-job-id"]
    assert first.content == again.content
    other_clip = bytearray(speech_clip("wav"))
    other_clip[1000:1200] = bytes(sample ^ 1 for sample in other_clip[1000:1200])  # same name and size
    other = await server.client.post(
        "/v1/voice/generate", **form(bytes(other_clip), text="Only once, please."), headers={"Idempotency-Key": key}
    )
    assert (other.status_code, other.json()["code"]) == (409, "idempotency_key_reused")

    put_reference(s3, server.bucket, "voice/refs/once.wav", speech_clip("wav"))
    by_key = {"ref_audio_key": "voice/refs/once.wav", "ref_text": REF_TEXT, "text": "stored once", "language": "auto"}
    before = set(s3.keys(server.bucket, "voice/generated/"))
    r2_key = f"voice-r2-{uuid.uuid4()}"
    stored = [
        await server.client.post("/v1/r2/voice/generate", json=by_key, headers={"Idempotency-Key": r2_key})
        for _ in range(2)
    ]
    assert stored[0].status_code == stored[1].status_code == 200
    assert stored[0].json() == stored[1].json()
    assert set(s3.keys(server.bucket, "voice/generated/")) - before == {stored[0].json()["key"]}


def test_rotary_frequencies_are_computed_not_left_uninitialised(server):
    """transformers 5 leaves non-persistent buffers uninitialised when it loads qwen_tts's classes; the loader
    recomputes every rotary `inv_freq` (garbage there gave inf/nan logits or position-blind speech)."""
    cloner = VoiceCloner.load(server.services.settings)
    model = cloner._model.model
    rotary = [
        module
        for root in (model, model.speech_tokenizer.model)
        for module in root.modules()
        if getattr(module, "rope_init_fn", None) is not None
    ]
    assert len(rotary) == 3  # talker, code predictor, speech-tokenizer decoder
    for module in rotary:
        expected, _ = module.rope_init_fn(module.config, module.inv_freq.device)
        assert torch.equal(module.inv_freq, expected)


async def test_a_long_answer_is_encoded_while_the_model_speaks_its_next_batch(server, make_settings, monkeypatch):
    """A whole answer of several model calls: each call's audio goes to the MP3 encoder (another thread) while the
    model speaks the next, and the file is the one encode_mp3 makes of the joined waveform."""
    settings = make_settings(VOICE_ENABLED="1", VOICE_CHUNK_CHARS="60")
    pieces = split_text(PARAGRAPH, 60)
    assert len(pieces) > 4, "more than one model call (4 pieces a call)"
    cloner = server.processor.runtime.voice
    encoded_some = threading.Event()
    overlapped: list[bool] = []
    calls: list[int] = []
    joined: list[np.ndarray] = []
    speak = cloner._speak
    write = Mp3File.write

    def speak_watched(prompt, texts, language):
        if calls:  # a later call: the audio of the ones before it is being encoded meanwhile
            overlapped.append(encoded_some.wait(timeout=10))
        calls.append(len(texts))
        return speak(prompt, texts, language)

    def write_watched(encoder, samples):
        joined.append(np.asarray(samples, dtype=np.float32))
        write(encoder, samples)
        encoded_some.set()

    monkeypatch.setattr(cloner, "_speak", speak_watched)
    monkeypatch.setattr(Mp3File, "write", write_watched)
    handler = VoiceGenerateHandler(store=await open_store(settings), cloner=cloner, settings=settings)
    payload = VoiceGenerateV1(ref_audio=speech_clip("wav"), ref_text=REF_TEXT, text=PARAGRAPH, language="English")
    [outcome] = await handler.handle([Job(str(uuid.uuid4()), VOICE_GENERATE, payload, priority=0)])
    assert isinstance(outcome, Succeeded), outcome
    assert overlapped and all(overlapped), "each later model call began with the earlier audio being encoded"
    assert outcome.result["pieces"] == len(pieces)
    assert len(calls) > 1 and sum(calls) == len(pieces)
    bitrate = settings.voice_mp3_bitrate_kbps * 1000
    assert outcome.attachment == encode_mp3(np.concatenate(joined), SAMPLE_RATE, bitrate)
