"""Cancelling a queued job (POST /v1/jobs/{id}/cancel): its record says so, a request waiting for it is answered at
once, and the processor that later takes its message makes nothing of it. The API runs alone (python -m api), so
jobs stay queued until a test starts a processor on the same broker and store."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import msgspec
import pytest

from contract.jobs import JobStore, NotCancellableError, cancel_queued, job_id_for_idempotency_key, record_headers
from contract.messages import IMAGE_GENERATE, VOICE_GENERATE
from contract.metrics import REGISTRY
from infra.settings import Settings
from infra.storage.local import LocalStore
from processor.handlers.base import Job
from processor.outcomes import Failed, Succeeded
from processor.tracking import JobTracker, Tracked
from tests.support.amqp import next_reply, publish, wait_until
from tests.support.audio import speech_clip
from tests.support.server import running_server
from tests.test_processor import consuming, vhost_of
from tests.test_voice import form

PARAMS = {"prompt": "a job nobody wants any more", "width": 64, "height": 64, "steps": 2}
CANCELLED_LABEL = {"type": IMAGE_GENERATE, "outcome": "cancelled"}


@pytest.fixture(scope="module")
def settings(make_env) -> Settings:
    env = make_env(IMAGE_ENABLED="1", VOICE_ENABLED="1", IMAGE_SEARCH_ENABLED="0", PROCESSOR_CAPABILITIES="image")
    return Settings.from_env(env)


@pytest.fixture(scope="module")
async def server(settings):
    async with running_server(settings, with_processor=False) as running:
        yield running


def _jobs(server) -> JobStore:
    return JobStore(server.services.store, 7)


def _queue_empty(rabbit, settings: Settings) -> bool:
    counts = rabbit.queue_counts(vhost_of(settings))
    return counts["ams.image"] == (0, 0) and counts["ams.dead"] == (0, 0)


async def _queued_job(server, seed: int) -> str:
    response = await server.client.post("/v1/jobs", json={"type": IMAGE_GENERATE, "params": {**PARAMS, "seed": seed}})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


async def test_a_cancelled_job_never_runs_and_the_next_one_does(server, settings, rabbit):
    client = server.client
    unwanted, wanted = await _queued_job(server, 1), await _queued_job(server, 2)
    response = await client.post(f"/v1/jobs/{unwanted}/cancel")
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["job_id"], job["status"], job["error"]["code"]) == (unwanted, "failed", "cancelled")
    assert "cancelled while queued" in job["error"]["message"] and job["finished_at"]
    assert (await client.get(f"/v1/jobs/{unwanted}")).json() == job
    again = await client.post(f"/v1/jobs/{unwanted}/cancel")
    assert (again.status_code, again.json()) == (200, job)  # cancelling twice is safe
    cancelled_before = REGISTRY.get_sample_value("ams_jobs_total", CANCELLED_LABEL) or 0

    async with consuming(settings):

        async def wanted_done() -> bool:
            return (await client.get(f"/v1/jobs/{wanted}")).json()["status"] == "succeeded"

        await wait_until(wanted_done, timeout=60)
        await wait_until(lambda: _queue_empty(rabbit, settings), timeout=30)
    assert (await client.get(f"/v1/jobs/{unwanted}")).json() == job
    assert not await server.services.store.exists(f"images/generated/{unwanted}.png")
    assert await server.services.store.exists(f"images/generated/{wanted}.png")
    assert REGISTRY.get_sample_value("ams_jobs_total", CANCELLED_LABEL) == cancelled_before + 1


async def test_a_request_waiting_for_its_job_is_answered_when_it_is_cancelled(server):
    """A waiting generation whose job is cancelled answers 409 `cancelled` at once, not after SYNC_TIMEOUT_SECONDS;
    its Idempotency-Key keeps answering with the cancelled job."""
    client = server.client
    key = {"Idempotency-Key": f"cancel-me-{uuid.uuid4()}"}
    job_id = job_id_for_idempotency_key(IMAGE_GENERATE, key["Idempotency-Key"])
    waiting = asyncio.create_task(client.post("/v1/images/generate", json={**PARAMS, "seed": 3}, headers=key))

    async def recorded() -> bool:
        return await _jobs(server).get(job_id) is not None

    await wait_until(recorded, timeout=10)
    await asyncio.sleep(0.1)  # the request is waiting for its reply now
    assert not waiting.done()
    assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    answered = await asyncio.wait_for(waiting, 5)
    assert answered.status_code == 409, answered.text
    assert answered.json()["code"] == "cancelled"
    retried = await client.post("/v1/images/generate", json={**PARAMS, "seed": 3}, headers=key)
    assert (retried.status_code, retried.json()["code"]) == (409, "cancelled")


async def test_a_streamed_voice_clone_waiting_for_its_first_piece_is_answered_when_it_is_cancelled(server):
    client = server.client
    key = f"cancel-my-stream-{uuid.uuid4()}"
    job_id = job_id_for_idempotency_key(VOICE_GENERATE, key)
    waiting = asyncio.create_task(
        client.post(
            "/v1/voice/generate",
            params={"stream": "true"},
            headers={"Accept": "audio/mpeg", "Idempotency-Key": key},
            **form(speech_clip("wav")),
        )
    )

    async def recorded() -> bool:
        return await _jobs(server).get(job_id) is not None

    await wait_until(recorded, timeout=10)
    await asyncio.sleep(0.1)
    assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    answered = await asyncio.wait_for(waiting, 5)
    assert (answered.status_code, answered.json()["code"]) == (409, "cancelled")


async def test_a_requester_waiting_in_another_process_gets_the_cancellation_from_the_processor(
    server, settings, rabbit
):
    """The API that cancels a job may not be the one whose request waits for it: the processor that takes the
    message answers the requester's reply queue with the job's error."""
    jobs = _jobs(server)
    queued = JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, {**PARAMS, "seed": 4})
    version = await jobs.create(queued)
    assert (await server.client.post(f"/v1/jobs/{queued.job_id}/cancel")).status_code == 200
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        await publish(
            settings.amqp_url,
            IMAGE_GENERATE,
            {**PARAMS, "seed": 4},
            message_id=queued.job_id,
            headers=record_headers(queued, version),
            reply_to=replies.name,
        )
        async with consuming(settings):
            await wait_until(lambda: _queue_empty(rabbit, settings), timeout=30)
            reply = await next_reply(replies, timeout=5)
    assert reply is not None
    body = msgspec.json.decode(reply.body)
    assert (body["status"], body["error"]["code"]) == ("failed", "cancelled")
    assert not await server.services.store.exists(f"images/generated/{queued.job_id}.png")


async def test_only_a_queued_job_can_be_cancelled(server):
    client, jobs = server.client, _jobs(server)
    assert (await client.post(f"/v1/jobs/{uuid.uuid4()}/cancel")).json()["code"] == "job_not_found"
    assert (await client.post("/v1/jobs/not-a-uuid/cancel")).status_code == 404
    for status in ("running", "succeeded", "failed"):
        record = msgspec.structs.replace(JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, PARAMS), status=status)
        await jobs.create(record)
        refused = await client.post(f"/v1/jobs/{record.job_id}/cancel")
        assert refused.status_code == 409, refused.text
        assert refused.json()["code"] == "job_not_cancellable"
        assert f"it is {status}" in refused.json()["message"]
        assert await jobs.get(record.job_id) == record


async def test_a_processor_that_marks_the_job_running_first_wins(server, monkeypatch):
    """The cancellation is conditional on the version it read: a running mark written meanwhile makes it fail,
    and the record read again says the job is running (409), so the job runs and is not reported cancelled."""
    jobs = _jobs(server)
    record = JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, {**PARAMS, "seed": 5})
    version = await jobs.create(record)
    running = msgspec.structs.replace(record, status="running", attempts=1)
    update = JobStore.update
    marked: list[str] = []

    async def mark_first(self, new, etag, **kwargs):
        if not marked:
            marked.append(await update(self, running, version))
        return await update(self, new, etag, **kwargs)

    monkeypatch.setattr(JobStore, "update", mark_first)
    refused = await server.client.post(f"/v1/jobs/{record.job_id}/cancel")
    assert refused.status_code == 409, refused.text
    assert "it is running" in refused.json()["message"]
    assert marked and await jobs.get(record.job_id) == running


@pytest.mark.parametrize("final", [False, True])
async def test_a_duplicates_failure_leaves_the_job_running_under_the_other_delivery(tmp_path, final):
    """Two deliveries of one job run at once (a resend, a redelivery after a lost channel), each marked running,
    the second mark the newer. The first one's failure (retried, or final) is not written over the second one's
    mark: the job stays running, so a cancellation is still a 409, and the other delivery's success is recorded."""
    jobs = JobStore(LocalStore(tmp_path / "store"), 7)
    tracker = JobTracker(jobs)
    record = JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, {**PARAMS, "seed": 6})
    first = Tracked(record, await jobs.create(record))
    job = Job(message_id=record.job_id, message_type=IMAGE_GENERATE, payload=None, priority=9)
    assert await tracker.mark_running(first, 1)
    second = await tracker.load(job)
    assert await tracker.mark_running(second, 1)

    failure = Failed("device_memory_unavailable", "out of device memory", transient=not final)
    assert not await tracker.failed(first, failure, 1, final=final)
    assert (await jobs.get(record.job_id)).status == "running"
    with pytest.raises(NotCancellableError):
        await cancel_queued(jobs, record.job_id)

    assert await tracker.succeeded(second, Succeeded({"key": f"images/generated/{record.job_id}.png"}), 1)
    assert (await jobs.get(record.job_id)).status == "succeeded"


async def test_a_failure_is_still_written_over_a_running_mark_of_its_own_delivery(tmp_path):
    """A delivery's own mark, and a record that changed meanwhile to something other than another delivery's mark,
    still take its failure: the retry's record says queued."""
    jobs = JobStore(LocalStore(tmp_path / "store"), 7)
    tracker = JobTracker(jobs)
    record = JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, {**PARAMS, "seed": 7})
    tracked = Tracked(record, await jobs.create(record))
    assert await tracker.mark_running(tracked, 1)
    stored, version = await jobs.load(record.job_id)
    await jobs.update(msgspec.structs.replace(stored, callback_url=None), version)  # another write, not a mark
    failure = Failed("device_memory_unavailable", "out of device memory", transient=True)
    assert await tracker.failed(tracked, failure, 1, final=False)
    assert (await jobs.get(record.job_id)).status == "queued"


async def _marked_twice(tmp_path, seed: int) -> tuple[JobStore, JobTracker, Job, Tracked, Tracked]:
    """A job delivered twice at once (a resend, a redelivery after a lost channel), the first delivery's running mark
    written before the second's."""
    jobs = JobStore(LocalStore(tmp_path / "store"), 7)
    tracker = JobTracker(jobs)
    record = JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, {**PARAMS, "seed": seed})
    first = Tracked(record, await jobs.create(record))
    job = Job(message_id=record.job_id, message_type=IMAGE_GENERATE, payload=None, priority=9)
    assert await tracker.mark_running(first, 1)
    second = await tracker.load(job)
    assert await tracker.mark_running(second, 1)
    return jobs, tracker, job, first, second


async def test_the_newest_deliverys_retry_leaves_the_job_running_under_the_older_one(tmp_path):
    """The delivery whose running mark is the newer one fails and is retried while the older delivery still runs:
    the job is not put back to queued (and cancellable) under the older run, whose success is then recorded."""
    jobs, tracker, _, first, second = await _marked_twice(tmp_path, 8)
    failure = Failed("device_memory_unavailable", "out of device memory", transient=True)
    assert not await tracker.failed(second, failure, 1, final=False)
    assert (await jobs.get(first.record.job_id)).status == "running"
    with pytest.raises(NotCancellableError):
        await cancel_queued(jobs, first.record.job_id)

    assert await tracker.succeeded(first, Succeeded({"key": f"images/generated/{first.record.job_id}.png"}), 1)
    stored = await jobs.get(first.record.job_id)
    assert (stored.status, stored.marks) == ("succeeded", [])


async def test_the_last_running_delivery_to_fail_puts_the_job_back_to_queued(tmp_path):
    """Each failure takes only its own delivery's mark off the record: once none is left the job is queued for its
    retry again, and can be cancelled."""
    jobs, tracker, _, first, second = await _marked_twice(tmp_path, 9)
    failure = Failed("device_memory_unavailable", "out of device memory", transient=True)
    assert not await tracker.failed(second, failure, 1, final=False)
    assert await tracker.failed(first, failure, 1, final=False)
    stored = await jobs.get(first.record.job_id)
    assert (stored.status, stored.marks, stored.last_error.code) == ("queued", [], "device_memory_unavailable")
    assert (await cancel_queued(jobs, first.record.job_id)).record.status == "failed"


async def test_a_dead_deliverys_mark_does_not_keep_the_job_running_for_ever(tmp_path):
    """A processor died running the job: its mark stays on the record, and nothing tells it from a duplicate still
    running. Its message comes again, and that delivery's retry leaves the job running under the dead mark; but a
    final failure takes the older marks off with its own (their deliveries are past or taken for dead, as RabbitMQ
    takes them): the job ends failed, not running for good."""
    jobs, tracker, job, _dead, redelivered = await _marked_twice(tmp_path, 10)
    failure = Failed("device_memory_unavailable", "out of device memory", transient=True)
    assert not await tracker.failed(redelivered, failure, 1, final=False)
    assert (await jobs.get(job.message_id)).status == "running"

    retried = await tracker.load(job)
    assert await tracker.mark_running(retried, 2)
    assert await tracker.failed(retried, failure, 2, final=True)
    stored = await jobs.get(job.message_id)
    assert (stored.status, stored.marks, stored.error.code) == ("failed", [], "device_memory_unavailable")


async def test_a_running_record_stored_before_marks_were_listed_is_read(tmp_path):
    """A record written in the form without `marks` (by an earlier version) reads as one with none listed: a
    delivery marks it, and its retry puts it back to queued."""
    store = LocalStore(tmp_path / "store")
    jobs, job_id = JobStore(store, 7), str(uuid.uuid4())
    old = msgspec.to_builtins(msgspec.structs.replace(JobStore.new(job_id, IMAGE_GENERATE, PARAMS), status="running"))
    old.pop("marks", None)
    await store.put(f"jobs/{job_id}.json", msgspec.json.encode(old), "application/json")
    tracker = JobTracker(jobs)
    tracked = await tracker.load(Job(message_id=job_id, message_type=IMAGE_GENERATE, payload=None, priority=9))
    assert (tracked.record.status, tracked.record.marks) == ("running", [])
    assert await tracker.mark_running(tracked, 2)
    failure = Failed("device_memory_unavailable", "out of device memory", transient=True)
    assert await tracker.failed(tracked, failure, 2, final=False)
    assert (await jobs.get(job_id)).status == "queued"


@pytest.mark.parametrize("reopened", ["replay", "restart"])
async def test_a_delivery_taken_for_dead_does_not_fail_the_job_run_anew(tmp_path, reopened):
    """The newer of two deliveries fails for good and takes the older one's mark off with its own (taken for dead),
    but the older one still runs. The job is then run anew: an operator's replay (running under its own mark), or a
    request with its Idempotency-Key starting it afresh (queued). The older delivery's failure, coming last, is not
    recorded (its mark is no longer listed): the new run is neither failed nor put back to queued under it, and its
    success is recorded."""
    jobs, tracker, job, older, newer = await _marked_twice(tmp_path, 11)
    failure = Failed("storage_unavailable", "the object store did not answer", transient=True)
    assert await tracker.failed(newer, failure, 5, final=True)
    assert (await jobs.get(job.message_id)).status == "failed"

    if reopened == "replay":
        again = await tracker.load(job, replayed=True)
        assert await tracker.mark_running(again, 1)
        expected = ("running", [again.mark])
    else:
        stored, version = await jobs.load(job.message_id)
        fresh = JobStore.new(job.message_id, IMAGE_GENERATE, stored.params)
        again = Tracked(fresh, await jobs.update(fresh, version))
        expected = ("queued", [])
    for final in (False, True):
        assert not await tracker.failed(older, failure, 5, final=final)
        stored = await jobs.get(job.message_id)
        assert (stored.status, stored.marks, stored.attempts, stored.error) == (*expected, again.record.attempts, None)

    assert await tracker.succeeded(again, Succeeded({"key": f"images/generated/{job.message_id}.png"}), 1)
    assert (await jobs.get(job.message_id)).status == "succeeded"
