"""Streamed voice (POST /v1/voice/generate?stream=true): the MP3 leaves sentence by sentence as it is spoken, the
stored object is the stream byte for byte, a client that leaves does not stop the job; and the parts it is built
from (the incremental MP3 encoder, the sentence splitter, the Accept check, the body that ends abnormally)."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import numpy as np
import pytest

from api.replies import ReplyListener, ReplyPiece
from api.streaming import StreamBrokenError, accepts, stream_pieces
from contract.audio import SAMPLE_RATE
from contract.errors import ErrorInfo
from contract.jobs import job_id_for_idempotency_key
from contract.messages import VOICE_GENERATE, JobReply
from contract.metrics import REGISTRY
from contract.mp3 import Mp3File, Mp3Stream, encode_mp3, mp3_seconds
from infra.broker import BrokerUnavailableError
from processor.text_chunks import split_sentences, split_text
from tests.support.amqp import wait_until
from tests.support.audio import mp3_info, speech_clip
from tests.support.server import running_server
from tests.test_voice import form

THREE_SENTENCES = "The first sentence is short. The second one follows it closely! And the third one ends the clip."
FIVE_SENTENCES = THREE_SENTENCES + " A fourth keeps the model busy. The fifth is the last one?"
STREAMED = {"params": {"stream": "true"}, "headers": {"Accept": "audio/mpeg"}}
# bare MP3 frames decode longer than the waveform: LAME's delay (1105 samples) and the padding of the frames its
# flush writes make it more than two frames of 576 samples longer and at most three (measured: 1153..1724 samples
# over waveforms of 1,000 to 87,000 samples)
BARE_FRAMES_EXTRA = (2 * 576 / SAMPLE_RATE, 3 * 576 / SAMPLE_RATE)


@pytest.fixture(scope="module")
async def server(make_settings, s3):
    bucket = s3.new_bucket()
    settings = make_settings(r2_bucket=bucket, endpoint=s3.endpoint, VOICE_ENABLED="1")
    async with running_server(settings) as running:
        running.bucket = bucket
        yield running


def stored_object(s3, bucket: str, job_id: str) -> bytes:
    return s3.client.get_object(Bucket=bucket, Key=f"voice/generated/{job_id}.mp3")["Body"].read()


async def finished_job(server, job_id: str, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = (await server.client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {seconds} s")


async def stream_voice(server, text: str, **request) -> tuple[dict, bytes, list[float]]:
    """(headers, body, when each read of the body returned) of a streamed request."""
    arrivals: list[float] = []
    body = b""
    async with server.client.stream(
        "POST", "/v1/voice/generate", **{**STREAMED, **request}, **form(speech_clip("wav"), text=text)
    ) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        async for chunk in response.aiter_raw():
            arrivals.append(time.monotonic())
            body += chunk
        return dict(response.headers), body, arrivals


async def test_the_mp3_leaves_as_each_sentence_is_spoken(server, monkeypatch):
    cloner = server.processor.runtime.voice
    spoken: list[float] = []  # when the model handed over each sentence
    clone = cloner.clone

    def timed_clone(**kwargs):
        def on_piece(wave: np.ndarray) -> None:
            spoken.append(time.monotonic())
            kwargs["on_piece"](wave)

        return clone(**{**kwargs, "on_piece": on_piece})

    monkeypatch.setattr(cloner, "clone", timed_clone)
    headers, body, arrivals = await stream_voice(server, THREE_SENTENCES)
    assert headers["content-type"] == "audio/mpeg"
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers and "x-audio-duration" not in headers
    uuid.UUID(headers["x-job-id"])
    assert len(spoken) == 3
    # the first sentence reached the client before the model had spoken the second, the rest came after
    assert arrivals[0] < spoken[1]
    assert arrivals[-1] > spoken[2]
    assert mp3_info(body)[1] == SAMPLE_RATE


async def test_the_stored_object_is_the_stream(server, s3):
    headers, body, _ = await stream_voice(server, THREE_SENTENCES)
    job_id = headers["x-job-id"]
    job = await finished_job(server, job_id)
    assert job["status"] == "succeeded", job
    stored = stored_object(s3, server.bucket, job_id)
    assert stored == body
    seconds, rate = mp3_info(body)
    assert mp3_info(stored) == (seconds, rate)
    result = job["result"]
    assert (result["size"], result["pieces"], result["sample_rate"]) == (len(body), 3, SAMPLE_RATE)
    low, high = BARE_FRAMES_EXTRA
    assert result["duration_seconds"] + low - 0.001 <= seconds <= result["duration_seconds"] + high + 0.001


async def test_a_client_that_leaves_does_not_stop_the_job(server, s3):
    async with server.client.stream(
        "POST", "/v1/voice/generate", params={"stream": "true"}, **form(speech_clip("wav"), text=FIVE_SENTENCES)
    ) as response:
        assert response.status_code == 200
        job_id = response.headers["x-job-id"]
        first = await anext(response.aiter_raw())
    job = await finished_job(server, job_id)
    assert job["status"] == "succeeded", job
    stored = stored_object(s3, server.bucket, job_id)
    assert stored.startswith(first) and len(stored) > len(first)
    assert job["result"]["pieces"] == 5


async def test_a_job_that_fails_mid_stream_truncates_the_body(server, s3, monkeypatch):
    clone = server.processor.runtime.voice.clone

    def fails_after_one_sentence(**kwargs):
        def on_piece(wave: np.ndarray) -> None:
            kwargs["on_piece"](wave)
            raise RuntimeError("the model fell over")

        return clone(**{**kwargs, "on_piece": on_piece})

    monkeypatch.setattr(server.processor.runtime.voice, "clone", fails_after_one_sentence)
    received = b""
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        async with server.client.stream(
            "POST", "/v1/voice/generate", **STREAMED, **form(speech_clip("wav"), text=THREE_SENTENCES)
        ) as response:
            assert response.status_code == 200
            job_id = response.headers["x-job-id"]
            async for chunk in response.aiter_raw():
                received += chunk
    assert received  # the first sentence came, then the body broke off
    job = await finished_job(server, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "internal_error")
    assert f"voice/generated/{job_id}.mp3" not in s3.keys(server.bucket, "voice/generated/")


async def test_a_redelivered_job_streams_the_stored_output(server, s3, monkeypatch):
    """The output is already stored (a delivery stored it, then the processor died before recording the result):
    the stored MP3 is sent as one piece and the model is not run again. (The output is put as the job's message
    leaves: one there before the request would be an earlier job's of the same key, which the API deletes.)"""
    key = f"stream-{uuid.uuid4()}"
    job_id = job_id_for_idempotency_key(VOICE_GENERATE, key)
    earlier = encode_mp3(np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    publisher = server.services.publisher
    real_publish = publisher.publish

    async def stored_by_an_earlier_delivery(**kwargs):
        s3.client.put_object(
            Bucket=server.bucket, Key=f"voice/generated/{job_id}.mp3", Body=earlier, ContentType="audio/mpeg"
        )
        return await real_publish(**kwargs)

    def no_model(**_):
        raise AssertionError("the model ran again")

    monkeypatch.setattr(publisher, "publish", stored_by_an_earlier_delivery)
    monkeypatch.setattr(server.processor.runtime.voice, "clone", no_model)
    idempotent = {"Idempotency-Key": key, **STREAMED["headers"]}
    headers, body, _ = await stream_voice(server, THREE_SENTENCES, headers=idempotent)
    assert (headers["x-job-id"], body) == (job_id, earlier)
    job = await finished_job(server, job_id)
    assert job["status"] == "succeeded", job
    assert job["result"]["size"] == len(earlier)
    assert job["result"]["duration_seconds"] == pytest.approx(1.0, abs=0.001)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_a_withdrawn_voice_job_stores_nothing(server, s3, monkeypatch, streamed):
    """The connection is lost before the confirm comes, and the message reaches its queue a moment after the API
    withdrew the job and answered 503: the model may speak, but the job waits for its running mark before storing
    its MP3, the mark finds the record withdrawn, and nothing is stored (the job is acknowledged as withdrawn)."""
    labels = {"type": VOICE_GENERATE, "outcome": "withdrawn"}
    before = REGISTRY.get_sample_value("ams_jobs_total", labels) or 0
    publisher = server.services.publisher
    real = publisher.publish
    sent: list[asyncio.Task[None]] = []
    job_ids: list[str] = []

    async def routed_later(**kwargs):
        async def later() -> None:
            await asyncio.sleep(0.5)
            await real(**kwargs)

        job_ids.append(kwargs["message_id"])
        sent.append(asyncio.create_task(later()))
        raise BrokerUnavailableError("the connection was lost before the confirm came")

    with monkeypatch.context() as patched:
        patched.setattr(publisher, "publish", routed_later)
        request = STREAMED if streamed else {}
        response = await server.client.post(
            "/v1/voice/generate", **request, **form(speech_clip("wav"), text=THREE_SENTENCES)
        )
    assert response.status_code == 503, response.text
    await sent[0]

    def settled_as_withdrawn() -> bool:
        return (REGISTRY.get_sample_value("ams_jobs_total", labels) or 0) - before == 1

    await wait_until(settled_as_withdrawn, timeout=60)
    job = (await server.client.get(f"/v1/jobs/{job_ids[0]}")).json()
    assert (job["status"], job["error"]["code"]) == ("failed", "withdrawn"), job
    assert f"voice/generated/{job_ids[0]}.mp3" not in s3.keys(server.bucket, "voice/generated/")


async def test_streaming_refuses_what_it_always_refused(server, s3):
    before = set(s3.keys(server.bucket, "voice/"))
    not_audio = await server.client.post(
        "/v1/voice/generate", **STREAMED, **form(b"these are the meeting notes, not a recording\n" * 50)
    )
    assert not_audio.status_code == 422
    assert not_audio.headers["content-type"] == "application/json"
    assert not_audio.json()["code"] == "not_audio"
    too_long = await server.client.post("/v1/voice/generate", **STREAMED, **form(speech_clip("wav"), text="x" * 5001))
    assert (too_long.status_code, too_long.json()["code"]) == (400, "text_too_long")
    assert set(s3.keys(server.bucket, "voice/")) == before


async def test_an_accept_header_without_mp3_is_406(server, s3):
    before = set(s3.keys(server.bucket, "voice/"))
    response = await server.client.post(
        "/v1/voice/generate",
        params={"stream": "true"},
        headers={"Accept": "application/json"},
        **form(speech_clip("wav")),
    )
    assert response.status_code == 406
    assert response.json()["code"] == "not_acceptable"
    assert "Accept: audio/mpeg" in response.json()["message"]
    assert set(s3.keys(server.bucket, "voice/")) == before


async def test_without_stream_the_answer_is_whole_as_before(server):
    response = await server.client.post(
        "/v1/voice/generate", params={"stream": "false"}, **form(speech_clip("wav"), text=THREE_SENTENCES)
    )
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    seconds, _ = mp3_info(response.content)
    assert seconds == pytest.approx(float(response.headers["x-audio-duration"]), abs=0.03)


async def test_no_first_sentence_within_the_timeout_is_202(make_settings):
    async with running_server(make_settings(VOICE_ENABLED="1", SYNC_TIMEOUT_SECONDS="0.1")) as server:
        response = await server.client.post(
            "/v1/voice/generate", **STREAMED, **form(speech_clip("wav"), text=FIVE_SENTENCES)
        )
        assert response.status_code == 202, response.text
        job = await finished_job(server, response.json()["job_id"])
        assert job["status"] == "succeeded"


# the parts


def _tone(seconds: float) -> np.ndarray:
    return (0.3 * np.sin(np.arange(int(seconds * SAMPLE_RATE)) * 2 * np.pi * 220 / SAMPLE_RATE)).astype(np.float32)


@pytest.mark.parametrize("seconds", [0.05, 1.0, 2.345, 3.7])
def test_mp3_stream_pieces_are_the_file(seconds):
    wave = _tone(seconds)
    encoder = Mp3Stream(SAMPLE_RATE, 128_000)
    pieces = [encoder.push(part) for part in np.array_split(wave, 5)] + [encoder.finish()]
    joined = b"".join(pieces)
    whole = Mp3Stream(SAMPLE_RATE, 128_000)
    assert joined == whole.push(wave) + whole.finish()
    # the one-shot file is the same frames behind its ID3 tag and Info frame, and written in parts it is the same
    assert encode_mp3(wave, SAMPLE_RATE, 128_000).endswith(joined)
    in_parts = Mp3File(SAMPLE_RATE, 128_000)
    for part in np.array_split(wave, 5):
        in_parts.write(part)
    assert in_parts.finish() == encode_mp3(wave, SAMPLE_RATE, 128_000)
    decoded, rate = mp3_info(joined)
    assert rate == SAMPLE_RATE
    low, high = BARE_FRAMES_EXTRA
    assert seconds + low - 0.001 <= decoded <= seconds + high + 0.001
    assert mp3_seconds(joined) == decoded


def test_mp3_stream_gives_bytes_as_it_goes():
    encoder = Mp3Stream(SAMPLE_RATE)
    assert encoder.push(np.zeros(0, dtype=np.float32)) == b""
    first = encoder.push(_tone(1.0))
    assert first.startswith(b"\xff") and len(first) > 0  # bare frames: no ID3 tag, the first frame sync at once
    assert len(encoder.finish()) > 0


def test_sentences_for_streaming():
    assert split_sentences(THREE_SENTENCES, 250) == [
        "The first sentence is short.",
        "The second one follows it closely!",
        "And the third one ends the clip.",
    ]
    assert split_text(THREE_SENTENCES, 250) == [THREE_SENTENCES]  # the whole path still packs them
    assert split_sentences("첫 문장입니다。두 번째 문장!\n세 번째", 250) == [
        "첫 문장입니다。",
        "두 번째 문장!",
        "세 번째",
    ]
    long = "word " * 30 + "end."
    pieces = split_sentences(f"Short one. {long}", 50)
    assert pieces[0] == "Short one."
    assert all(len(piece) <= 50 for piece in pieces) and len(pieces) > 2
    assert " ".join(pieces[1:]) == long.strip()


@pytest.mark.parametrize(
    ("accept", "ok"),
    [
        (None, True),
        ("", True),
        ("*/*", True),
        ("audio/*", True),
        ("audio/mpeg", True),
        ("application/json, audio/mpeg;q=0.5", True),
        ("text/html,application/xhtml+xml,*/*;q=0.8", True),
        ("application/json", False),
        ("audio/ogg", False),
        ("audio/mpeg;q=0, */*", False),
        ("audio/*;q=0", False),
    ],
)
def test_accept(accept, ok):
    assert accepts(accept, "audio/mpeg") is ok


def _listener(job_id: str, *events) -> tuple[ReplyListener, asyncio.Queue]:
    replies = ReplyListener(connection=None)
    queue = replies.expect_stream(job_id)
    for event in events:
        queue.put_nowait(event)
    return replies, queue


async def _drain(body) -> list[bytes]:
    return [chunk async for chunk in body]


async def test_the_body_ends_with_the_reply_and_forgets_the_job():
    replies, queue = _listener("j", ReplyPiece(3, b"def"), JobReply(job_id="j", status="succeeded"))
    assert await _drain(stream_pieces(replies, "j", queue, ReplyPiece(0, b"abc"), 1.0)) == [b"abc", b"def"]
    assert "j" not in replies._streams


@pytest.mark.parametrize(
    ("events", "reason"),
    [
        ((ReplyPiece(0, b"abc"),), "started over"),
        (
            (ReplyPiece(3, b"d"), JobReply(job_id="j", status="failed", error=ErrorInfo(code="x", message="y"))),
            "failed",
        ),
        ((ReplyPiece(3, b"d"),), "SYNC_TIMEOUT_SECONDS"),
    ],
)
async def test_the_body_ends_abnormally_mid_stream(events, reason):
    replies, queue = _listener("j", *events)
    body = stream_pieces(replies, "j", queue, ReplyPiece(0, b"abc"), 0.05)
    received = []
    with pytest.raises(StreamBrokenError, match=reason):
        async for chunk in body:
            received.append(chunk)
    assert received[0] == b"abc"
    assert "j" not in replies._streams


async def test_a_client_gone_forgets_the_job():
    replies, queue = _listener("j")
    body = stream_pieces(replies, "j", queue, ReplyPiece(0, b"abc"), 5.0)
    assert await anext(body) == b"abc"
    waiting = asyncio.ensure_future(anext(body))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert "j" not in replies._streams
