"""Deleting a generation's output on purpose: OUTPUT_TTL_DAYS (a processor's sweep deletes it that long after the job
finished) and DELETE /v1/jobs/{id}/output (at once). The job's record stays until JOB_RECORD_TTL_DAYS, saying when
and why its output was deleted; its Idempotency-Key answers 410, and a later delivery of its message does not make
the output again. Originals of indexed images are never touched, and without OUTPUT_TTL_DAYS outputs are kept, as
before."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import structlog

from contract.jobs import JobRecord, JobStore, Swept, delete_job_output, job_id_for_idempotency_key, record_key
from contract.messages import IMAGE_GENERATE, VOICE_GENERATE
from contract.metrics import REGISTRY
from infra.settings import Settings
from infra.storage import StorageError, StorageUnavailableError
from infra.storage.local import LocalStore
from processor import service
from processor.handlers.base import Job
from processor.interrupted_runs import InterruptedRuns
from processor.outcomes import Succeeded
from processor.outputs import StoredOutput, store_output
from processor.settler import Settler
from processor.tracking import JobTracker, Tracked
from tests.support.amqp import publish, wait_until
from tests.support.backdate import written_days_ago
from tests.support.deliveries import Delivery
from tests.support.images import encoded
from tests.support.server import running_server

BODY = {"prompt": "kept for a day", "width": 64, "height": 64, "steps": 2}


def _days_ago(days: float) -> str:
    return (datetime.now(tz=UTC) - timedelta(days=days)).isoformat(timespec="microseconds").replace("+00:00", "Z")


async def _finished_earlier(server, job_id: str, days: float) -> None:
    """Make a finished job look as if it finished `days` ago, its record last written then."""
    store = server.services.store
    stored = await store.get(record_key(job_id))
    record = msgspec.json.decode(stored.data, type=JobRecord)
    record = msgspec.structs.replace(record, finished_at=_days_ago(days))
    await store.put(record_key(job_id), msgspec.json.encode(record), "application/json", if_match=stored.etag)
    written_days_ago(server.services.settings.local_storage_dir, record_key(job_id), days)


def _deleted(reason: str) -> float:
    return REGISTRY.get_sample_value("ams_outputs_deleted_total", {"reason": reason}) or 0


async def _generated(server, seed: int, key: str | None = None) -> str:
    headers = {"Idempotency-Key": key} if key else {}
    response = await server.client.post("/v1/images/generate", json={**BODY, "seed": seed}, headers=headers)
    assert response.status_code == 200, response.text
    return response.headers["x-job-id"]


async def test_a_generated_output_is_deleted_once_past_its_time_and_its_job_says_so(make_env, monkeypatch):
    monkeypatch.setattr(service, "SWEEP_FIRST_AFTER_SECONDS", 0.2)
    monkeypatch.setattr(service, "SWEEP_INTERVAL_SECONDS", 0.2)
    env = make_env(IMAGE_ENABLED="1", OUTPUT_TTL_DAYS="1", JOB_RECORD_TTL_DAYS="7")
    async with running_server(Settings.from_env(env)) as server:
        store = server.services.store
        key = f"expiring-{uuid.uuid4()}"
        old = await _generated(server, 1, key)
        fresh = await _generated(server, 2)
        gone = await _generated(server, 3)
        upload = await server.client.post("/v1/images", files={"file": ("cat.png", encoded(4), "image/png")})
        assert upload.status_code == 201, upload.text
        image = upload.json()
        expired_before = _deleted("expired")
        await _finished_earlier(server, old, 2)
        await _finished_earlier(server, image["id"], 2)  # an indexing job: its result names the original
        await _finished_earlier(server, gone, 8)  # past JOB_RECORD_TTL_DAYS: the record goes, and its output

        async def swept() -> bool:
            job = (await server.client.get(f"/v1/jobs/{old}")).json()
            return job["output_deleted"] is not None and not await store.exists(record_key(gone))

        await wait_until(swept, timeout=20)
        assert _deleted("expired") == expired_before + 1  # the record that expired took its output unmarked
        assert not await store.exists(f"images/generated/{old}.png")
        assert not await store.exists(f"images/generated/{gone}.png")
        assert await store.exists(f"images/generated/{fresh}.png")
        assert await store.exists(image["r2_key"])
        assert (await server.client.get(f"/v1/images/{image['id']}")).status_code == 200

        job = (await server.client.get(f"/v1/jobs/{old}")).json()
        assert job["status"] == "succeeded" and job["output_deleted"]["reason"] == "expired"
        assert job["result"]["key"] == f"images/generated/{old}.png" and "url" not in job["result"]
        assert job["output_expires_at"] is None
        kept = (await server.client.get(f"/v1/jobs/{fresh}")).json()
        assert "url" in kept["result"]
        finished = datetime.fromisoformat(kept["finished_at"].replace("Z", "+00:00"))
        due = datetime.fromisoformat(kept["output_expires_at"].replace("Z", "+00:00"))
        assert due - finished == timedelta(days=1)

        retried = await server.client.post(
            "/v1/images/generate", json={**BODY, "seed": 1}, headers={"Idempotency-Key": key}
        )
        assert retried.status_code == 410, retried.text
        assert retried.json()["code"] == "output_expired"
        assert "new Idempotency-Key" in retried.json()["message"]

        # a later delivery of its message (an operator's replay) leaves the job as it is and makes nothing
        await publish(env["AMQP_URL"], IMAGE_GENERATE, {**BODY, "seed": 1}, message_id=old)
        after = await publish(env["AMQP_URL"], IMAGE_GENERATE, BODY)

        async def settled() -> bool:
            return (await server.client.get(f"/v1/jobs/{after}")).json().get("status") == "succeeded"

        await wait_until(settled, timeout=30)
        assert (await server.client.get(f"/v1/jobs/{old}")).json() == job
        assert not await store.exists(f"images/generated/{old}.png")


async def test_a_processor_sweeps_soon_after_it_starts(make_env, monkeypatch):
    """A processor restarted more often than hourly still sweeps: its first sweep comes a minute after start (here
    moments), then one an hour."""
    monkeypatch.setattr(service, "SWEEP_FIRST_AFTER_SECONDS", 0.5)
    env = make_env()
    settings = Settings.from_env(env)
    local = LocalStore(settings.local_storage_dir)
    record = JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, dict(BODY))
    record.status, record.finished_at = "succeeded", _days_ago(30)
    try:
        await JobStore(local, settings.job_record_ttl_days).create(record)
    finally:
        await local.close()
    written_days_ago(settings.local_storage_dir, record_key(record.job_id), 30)
    async with running_server(settings) as server:
        store = server.services.store

        async def swept() -> bool:
            return not await store.exists(record_key(record.job_id))

        await wait_until(swept, timeout=30)


@pytest.fixture(scope="module")
async def server(make_settings):
    async with running_server(make_settings(IMAGE_ENABLED="1")) as running:
        yield running


async def test_a_client_deletes_a_generated_output_at_once(server):
    """DELETE /v1/jobs/{id}/output: the output is gone, the job says so, its key answers 410 output_deleted; a
    second DELETE answers the same; jobs without a generated output are refused, and nothing is deleted."""
    key = f"deleted-{uuid.uuid4()}"
    job_id = await _generated(server, 6, key)
    store = server.services.store
    assert await store.exists(f"images/generated/{job_id}.png")
    assert (await server.client.get(f"/v1/jobs/{job_id}")).json()["output_expires_at"] is None  # outputs are kept
    before = _deleted("deleted")
    response = await server.client.delete(f"/v1/jobs/{job_id}/output")
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["job_id"], job["status"], job["output_deleted"]["reason"]) == (job_id, "succeeded", "deleted")
    assert "url" not in job["result"]
    assert not await store.exists(f"images/generated/{job_id}.png")
    assert (await server.client.get(f"/v1/jobs/{job_id}")).json() == job
    again = await server.client.delete(f"/v1/jobs/{job_id}/output")
    assert (again.status_code, again.json()) == (200, job)
    assert _deleted("deleted") == before + 1
    retried = await server.client.post(
        "/v1/images/generate", json={**BODY, "seed": 6}, headers={"Idempotency-Key": key}
    )
    assert (retried.status_code, retried.json()["code"]) == (410, "output_deleted")
    assert "DELETE /v1/jobs/{id}/output" in retried.json()["message"]

    upload = await server.client.post("/v1/images", files={"file": ("dog.png", encoded(7), "image/png")})
    image = upload.json()
    refused = await server.client.delete(f"/v1/jobs/{image['id']}/output")
    assert (refused.status_code, refused.json()["code"]) == (404, "no_output")
    assert "makes no generated image or voice" in refused.json()["message"]
    assert await store.exists(image["r2_key"])
    unknown = await server.client.delete(f"/v1/jobs/{uuid.uuid4()}/output")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "job_not_found")


async def test_a_job_not_finished_or_failed_has_no_output_to_delete(server):
    record = JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, dict(BODY))
    await JobStore(server.services.store, 7).create(record)
    response = await server.client.delete(f"/v1/jobs/{record.job_id}/output")
    assert (response.status_code, response.json()["code"]) == (409, "job_not_finished")
    assert "it is queued" in response.json()["message"]
    assert (await server.client.post(f"/v1/jobs/{record.job_id}/cancel")).status_code == 200
    response = await server.client.delete(f"/v1/jobs/{record.job_id}/output")
    assert (response.status_code, response.json()["code"]) == (404, "no_output")
    assert "it failed" in response.json()["message"]


async def test_a_delete_that_failed_after_its_mark_is_finished_by_a_retry_or_the_records_expiry(server, monkeypatch):
    """The record says the output is deleted before the object goes; should the object's delete fail (503), a
    retried DELETE deletes it, and so does the sweep that removes the expired record, with or without
    OUTPUT_TTL_DAYS."""
    store = server.services.store
    retried, left = await _generated(server, 8), await _generated(server, 9)

    async def unreachable(key: str) -> None:
        raise StorageUnavailableError("the object store went away")

    with monkeypatch.context() as patched:
        patched.setattr(store, "delete", unreachable)
        for job_id in (retried, left):
            failed = await server.client.delete(f"/v1/jobs/{job_id}/output")
            assert (failed.status_code, failed.json()["code"]) == (503, "storage_unavailable")
    for job_id in (retried, left):
        assert (await server.client.get(f"/v1/jobs/{job_id}")).json()["output_deleted"]["reason"] == "deleted"
        assert await store.exists(f"images/generated/{job_id}.png")

    again = await server.client.delete(f"/v1/jobs/{retried}/output")
    assert again.status_code == 200, again.text
    assert not await store.exists(f"images/generated/{retried}.png")

    await JobStore(store, 7).sweep(None)  # the record is fresh: its output is not looked at
    assert await store.exists(f"images/generated/{left}.png")
    await _finished_earlier(server, left, 30)
    await JobStore(store, 7).sweep(None)
    assert not await store.exists(record_key(left))
    assert not await store.exists(f"images/generated/{left}.png")


async def test_without_output_ttl_outputs_are_kept_even_past_their_records(server):
    store = server.services.store
    job_id = await _generated(server, 5)
    await _finished_earlier(server, job_id, 30)
    swept = await JobStore(store, 7).sweep(server.services.settings.output_ttl_days)
    assert swept.outputs == 0  # (the record may be gone already: the server sweeps a minute after it starts)
    assert not await store.exists(record_key(job_id))
    assert await store.exists(f"images/generated/{job_id}.png")


async def test_a_sweep_keeps_a_record_that_replaced_the_expired_one_it_read(tmp_path, monkeypatch):
    """An Idempotency-Key used again after its record expired replaces that record (create), and its new job stores
    its output under the same key. Should both land between the sweep's read of the expired record and its
    deletes, the new record and the new job's output stay (the API deleted the old output when it replaced it)."""
    store = LocalStore(tmp_path / "store")
    jobs = JobStore(store, 1)
    job_id = job_id_for_idempotency_key(IMAGE_GENERATE, "used again")
    output = f"images/generated/{job_id}.png"
    old = JobStore.new(job_id, IMAGE_GENERATE, {"prompt": "p"}, idempotency_key="used again")
    old = msgspec.structs.replace(old, status="succeeded", finished_at=_days_ago(2), result={"key": output})
    await jobs.create(old)
    await store.put(output, b"the old job's png", "image/png")
    written_days_ago(tmp_path / "store", record_key(job_id), 2)
    read_many = jobs._read_many

    async def read_then_replaced(keys: list[str]) -> list[tuple[str, JobRecord, str]]:
        found = await read_many(keys)
        await jobs.create(JobStore.new(job_id, IMAGE_GENERATE, {"prompt": "p"}, idempotency_key="used again"))
        await store.put(output, b"the new job's png", "image/png")
        return found

    monkeypatch.setattr(jobs, "_read_many", read_then_replaced)
    assert await jobs.sweep(1) == Swept(records=0, outputs=0)
    assert (await jobs.get(job_id)).status == "queued"
    assert (await store.get(output)).data == b"the new job's png"


@pytest.mark.parametrize(
    ("env", "days"),
    [({}, None), ({"OUTPUT_TTL_DAYS": "0.5"}, 0.5), ({"OUTPUT_TTL_DAYS": "30", "JOB_RECORD_TTL_DAYS": "30"}, 30.0)],
)
def test_output_ttl_is_off_unless_set(make_env, env, days):
    assert Settings.from_env(make_env(**env)).output_ttl_days == days


async def test_a_record_whose_finish_cannot_be_read_is_swept_not_a_stop_to_the_sweep(tmp_path):
    """A record whose `finished_at` is no time (written by hand, or by another tool) reads as absent and is deleted
    like an expired one; one without an offset counts as UTC; neither stops the sweep of the records after it."""
    store = LocalStore(tmp_path / "store")
    jobs = JobStore(store, 1)
    finishes = {"a-not-a-time": "yesterday", "b-no-offset": _days_ago(3).removesuffix("Z"), "c-expired": _days_ago(3)}
    for name, finished_at in finishes.items():
        job_id = str(uuid.uuid5(uuid.NAMESPACE_URL, name))
        record = JobStore.new(job_id, IMAGE_GENERATE, {"prompt": "p"})
        await jobs.create(msgspec.structs.replace(record, status="failed", finished_at=finished_at))
        written_days_ago(tmp_path / "store", record_key(job_id), 3)
        assert await jobs.load(job_id) is None
    assert await jobs.sweep() == Swept(records=3, outputs=0)
    assert [info async for info in store.list("jobs/")] == []


async def _two_running_deliveries(jobs: JobStore, job_id: str) -> tuple[Job, Tracked, Job, Tracked]:
    """A job delivered twice at once (a resend, a redelivery after a lost channel): both marked running."""
    record = JobStore.new(job_id, VOICE_GENERATE, {"text": "said twice"})
    tracker = JobTracker(jobs)
    first = Tracked(record, await jobs.create(record))
    job = Job(message_id=job_id, message_type=VOICE_GENERATE, payload=None, priority=9)
    first_mark = tracker.mark_running(first, 1)
    assert await first_mark
    second = await tracker.load(job)
    second_mark = tracker.mark_running(second, 1)
    assert await second_mark
    return (
        dataclasses.replace(job, marking=first_mark),
        first,
        dataclasses.replace(job, marking=second_mark),
        second,
    )


async def _settled(settler: Settler, job: Job, tracked: Tracked, stored: StoredOutput) -> None:
    delivery = Delivery(job.message_id)
    outcome = Succeeded({"key": stored.key}, unflushed=(stored.key,), created=stored.created)
    await settler.settle(delivery, job, outcome, 0.1, tracked)
    assert delivery.acked


async def test_an_output_deleted_while_a_duplicate_ran_does_not_come_back(tmp_path):
    """Two deliveries of a job run at once. The first stores the voice and succeeds, and its client deletes the
    output; the second then stores it again and finds the record settled: it deletes what it stored, so the
    record saying the output was deleted stays true."""
    store = LocalStore(tmp_path / "store")
    jobs = JobStore(store, 7)
    settler = Settler(None, jobs, store, 3)  # a success without a requester publishes nothing
    job_id = str(uuid.uuid4())
    key = f"voice/generated/{job_id}.mp3"
    first_job, first, second_job, second = await _two_running_deliveries(jobs, job_id)
    stored = await store_output(first_job, store, key, b"the first delivery's mp3", "audio/mpeg")
    assert isinstance(stored, StoredOutput) and stored.created
    await _settled(settler, first_job, first, stored)
    deleted = await delete_job_output(jobs, job_id)
    assert deleted is not None and not await store.exists(key)

    again = await store_output(second_job, store, key, b"the second delivery's mp3", "audio/mpeg")
    assert isinstance(again, StoredOutput) and again.created
    await _settled(settler, second_job, second, again)
    assert (await jobs.get(job_id)).output_deleted is not None
    assert not await store.exists(key)


async def test_a_duplicates_output_that_the_record_names_is_kept(tmp_path):
    """The second delivery stored the output first, and the first one, finding it, recorded the job's success: the
    output is the one the record names, and stays when the second finds the record settled."""
    store = LocalStore(tmp_path / "store")
    jobs = JobStore(store, 7)
    settler = Settler(None, jobs, store, 3)
    job_id = str(uuid.uuid4())
    key = f"voice/generated/{job_id}.mp3"
    first_job, first, second_job, second = await _two_running_deliveries(jobs, job_id)
    made = await store_output(second_job, store, key, b"the second delivery's mp3", "audio/mpeg")
    found = await store_output(first_job, store, key, b"the first delivery's mp3", "audio/mpeg")
    assert isinstance(made, StoredOutput) and made.created
    assert isinstance(found, StoredOutput) and not found.created
    await _settled(settler, first_job, first, found)
    await _settled(settler, second_job, second, made)
    assert (await jobs.get(job_id)).status == "succeeded"
    assert (await store.get(key)).data == b"the second delivery's mp3"


async def test_a_store_refusing_the_hourly_sweep_is_a_warning_not_a_crash(tmp_path, monkeypatch):
    """Credentials that may not list the bucket (a token scoped to other prefixes): each sweep logs one warning line
    saying why, not a traceback as for a bug, and the next sweep tries again."""
    store = LocalStore(tmp_path / "store")

    async def refused(prefix: str = ""):
        raise StorageError("access denied: ListObjectsV2")
        yield

    monkeypatch.setattr(store, "list", refused)
    monkeypatch.setattr(service, "SWEEP_FIRST_AFTER_SECONDS", 0)
    monkeypatch.setattr(service, "SWEEP_INTERVAL_SECONDS", 0.05)
    jobs = JobStore(store, 7)
    with structlog.testing.capture_logs() as logs:
        sweeping = asyncio.create_task(
            service._expire_job_records(jobs, None, InterruptedRuns(store, 3), timedelta(days=7), store, "index.")
        )
        await wait_until(lambda: sum(entry["event"] == "job_record_sweep_failed" for entry in logs) >= 2, timeout=5)
        sweeping.cancel()
    assert "job_record_sweep_crashed" not in [entry["event"] for entry in logs]
