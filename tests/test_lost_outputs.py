"""On the embedded store a generated image or voice is answered before it is flushed to the disk, and flushed
before its message is acked. A power failure in between can lose the output, or leave it empty, while its record
(written just as early) says succeeded: the unacked message then comes again, and that delivery makes the output
again. An output that is intact is never made twice."""

from __future__ import annotations

import uuid

import pytest

from contract.jobs import JobStore, delete_job_output
from contract.messages import IMAGE_GENERATE, STREAM_HEADER, VOICE_GENERATE, ImageGenerateV1
from infra.storage.local import LocalStore
from processor.handlers.base import Job
from processor.outcomes import Failed, Succeeded
from processor.outputs import StoredOutput, store_output
from processor.settler import Settler
from processor.tracking import JobTracker, Tracked
from tests.support.amqp import publish, wait_until
from tests.support.audio import speech_clip
from tests.support.deliveries import Delivery
from tests.support.server import running_server
from tests.test_voice import REF_TEXT

REFERENCE_KEY = "voice/refs/lost.wav"
NO_ONE_LISTENS = "ams.reply.nobody"  # a requester that asked for the voice streamed, and went away

JOBS = {
    "image": (IMAGE_GENERATE, {"prompt": "kept on disk", "seed": 3, "width": 64, "height": 64}, "images/generated/"),
    "voice": (
        VOICE_GENERATE,
        {"ref_audio_key": REFERENCE_KEY, "ref_text": REF_TEXT, "text": "Only one sentence.", "language": "English"},
        "voice/generated/",
    ),
}


@pytest.fixture(scope="module")
async def server(make_settings):
    async with running_server(make_settings(IMAGE_ENABLED="1", VOICE_ENABLED="1")) as running:
        await running.services.store.put(REFERENCE_KEY, speech_clip("wav"), "audio/wav")
        yield running


async def _record(server, job_id: str) -> dict:
    return (await server.client.get(f"/v1/jobs/{job_id}")).json()


async def _run(server, job_type: str, body: dict, job_id: str, *, streamed: bool) -> None:
    """Publish the job (again) and wait until it and a job published after it are settled: one consumer takes a
    queue's jobs of one priority in order, so the first was settled before the second."""
    settings = server.services.settings
    extra = {"headers": {STREAM_HEADER: True}, "reply_to": NO_ONE_LISTENS} if streamed else {}
    await publish(settings.amqp_url, job_type, body, message_id=job_id, **extra)
    after = await publish(settings.amqp_url, job_type, body)

    async def settled() -> bool:
        return (await _record(server, after)).get("status") == "succeeded"

    await wait_until(settled, timeout=60)


@pytest.mark.parametrize("damage", ["empty", "missing", "intact"])
@pytest.mark.parametrize("kind", ["image", "voice", "voice-streamed"])
async def test_a_lost_output_is_made_again_by_the_next_delivery(server, kind, damage):
    job_type, body, prefix = JOBS[kind.split("-")[0]]
    streamed = kind.endswith("streamed")
    store = server.services.store
    job_id = str(uuid.uuid4())
    key = f"{prefix}{job_id}{'.png' if job_type == IMAGE_GENERATE else '.mp3'}"
    await _run(server, job_type, body, job_id, streamed=streamed)
    first = await _record(server, job_id)
    assert first["status"] == "succeeded" and first["result"]["key"] == key
    made = (await store.get(key)).data
    assert made

    # what a power failure before the flush can leave: the record as written, the output empty or gone
    if damage == "empty":
        await store.put(key, b"", "application/octet-stream")
    elif damage == "missing":
        await store.delete(key)
    await _run(server, job_type, body, job_id, streamed=streamed)

    again = await _record(server, job_id)
    assert again["status"] == "succeeded"
    assert again["result"]["key"] == key
    stored = (await store.get(key)).data
    if damage == "intact":
        assert again["finished_at"] == first["finished_at"]  # not run again
        assert stored == made
    else:
        assert again["finished_at"] > first["finished_at"]  # run again, and recorded again
        assert len(stored) == again["result"]["size"] > 0
        assert (await store.get(key)).content_type == ("image/png" if job_type == IMAGE_GENERATE else "audio/mpeg")
        if job_type == IMAGE_GENERATE:
            assert stored == made  # the same seed draws the same image


async def test_a_retried_request_whose_output_was_lost_gets_a_503_until_it_is_made_again(server):
    body = {"prompt": "asked twice", "seed": 5, "width": 64, "height": 64}
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    first = await server.client.post("/v1/images/generate", json=body, headers=headers)
    assert first.status_code == 200, first.text
    job_id = first.headers["x-job-id"]
    await server.services.store.put(f"images/generated/{job_id}.png", b"", "image/png")  # a power failure's leftover

    retried = await server.client.post("/v1/images/generate", json=body, headers=headers)
    assert retried.status_code == 503, retried.text
    assert retried.json()["code"] == "output_unavailable"
    assert int(retried.headers["retry-after"]) > 0

    await _run(server, IMAGE_GENERATE, body, job_id, streamed=False)  # the unacked message comes again
    again = await server.client.post("/v1/images/generate", json=body, headers=headers)
    assert again.status_code == 200
    assert again.content == first.content


async def test_a_remake_that_fails_leaves_the_record_succeeded(tmp_path):
    """The job whose output was lost runs again; if that run fails, whether it is retried or dead-lettered, the
    record still says succeeded (a record only moves forward): not queued again, nor failed."""
    jobs = JobStore(LocalStore(tmp_path), ttl_days=1)
    tracker = JobTracker(jobs)
    job = Job(message_id="j", message_type=IMAGE_GENERATE, payload=ImageGenerateV1(prompt="p"), priority=9)
    tracked = await tracker.load(job)
    await tracker.mark_running(tracked, 1)
    assert await tracker.succeeded(tracked, Succeeded({"key": "images/generated/j.png"}), 1)
    first = await jobs.get("j")
    for attempt, final in ((1, False), (5, True)):
        again = await tracker.load(job)
        again.remaking = True  # what the consumer does when the output is lost
        failure = Failed("storage_unavailable", "a blip", transient=True)
        written = await tracker.failed(again, failure, attempt, final=final)
        assert await jobs.get("j") == first
        assert not written


@pytest.mark.parametrize("deleted", ["before the remake stores it", "after the remake stored it"])
async def test_an_output_deleted_while_it_is_remade_stays_deleted(tmp_path, deleted):
    """The voice a succeeded record names was lost, and its job runs again to remake it; meanwhile the client
    deletes the output (DELETE /v1/jobs/{id}/output). The remake's success is not written over the record saying
    so, and the voice it stored is deleted again: an output deleted on purpose does not come back."""
    store = LocalStore(tmp_path / "store")
    jobs = JobStore(store, 7)
    settler = Settler(None, jobs, store, 3)  # a success without a requester publishes nothing
    job_id = str(uuid.uuid4())
    key = f"voice/generated/{job_id}.mp3"
    job = Job(message_id=job_id, message_type=VOICE_GENERATE, payload=None, priority=9)
    record = JobStore.new(job_id, VOICE_GENERATE, {"text": "said once"})
    first = Tracked(record, await jobs.create(record))
    await settler.tracker.mark_running(first, 1)
    assert await settler.tracker.succeeded(first, Succeeded({"key": key}), 1)  # its voice then lost: never stored

    remake = await settler.tracker.load(job)
    remake.remaking = True  # what the consumer does when the output is lost
    if deleted.startswith("before"):
        deletion = await delete_job_output(jobs, job_id)
    stored = await store_output(job, store, key, b"the remade mp3", "audio/mpeg")
    assert isinstance(stored, StoredOutput) and stored.created
    if deleted.startswith("after"):
        deletion = await delete_job_output(jobs, job_id)
    delivery = Delivery(job_id)
    outcome = Succeeded({"key": key}, unflushed=(key,), created=stored.created)
    await settler.settle(delivery, job, outcome, 0.1, remake)

    assert delivery.acked
    assert await jobs.get(job_id) == deletion.record
    assert not await store.exists(key)
