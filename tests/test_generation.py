"""Image generation through the queue: seed endpoints, the async job API, idempotency, timeouts, priority."""

from __future__ import annotations

import asyncio
import base64
import io
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import torch
from PIL import Image

from contract.jobs import JobStore, job_id_for_idempotency_key, record_headers
from contract.messages import IMAGE_INDEX
from infra.broker import ATTEMPTS_HEADER
from infra.settings import Settings
from infra.storage import StorageUnavailableError
from infra.storage.local import LocalStore
from processor.scheduler import PIPELINE_DEPTH
from tests.support.amqp import publish, publish_many, wait_until
from tests.support.images import encoded
from tests.support.server import running_server


@pytest.fixture(scope="module")
async def server(make_settings, s3):
    bucket = s3.new_bucket()
    settings = make_settings(r2_bucket=bucket, endpoint=s3.endpoint, IMAGE_ENABLED="1")
    async with running_server(settings) as running:
        running.bucket = bucket
        yield running


async def generate(server, **body):
    return await server.client.post("/v1/images/generate", json=body)


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


async def test_readiness_includes_the_image_model(server):
    ready = await server.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["image_model"] == "ok"


async def test_png_of_the_requested_size(server):
    response = await generate(server, prompt="A serene landscape with mountains", seed=42, width=96, height=64)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "42"
    uuid.UUID(response.headers["x-job-id"])
    assert png_size(response.content) == (96, 64)


async def test_defaults_apply_when_only_prompt_and_seed_are_given(server):
    response = await generate(server, prompt="defaults", seed=1)
    assert response.status_code == 200
    settings = server.services.settings
    assert png_size(response.content) == (settings.image_default_width, settings.image_default_height)


async def test_same_seed_same_bytes_different_seed_different_image(server):
    first = await generate(server, prompt="a lighthouse", seed=7, width=64, height=64)
    second = await generate(server, prompt="a lighthouse", seed=7, width=64, height=64)
    other = await generate(server, prompt="a lighthouse", seed=8, width=64, height=64)
    assert first.content == second.content
    assert first.content != other.content


async def test_an_absent_seed_is_drawn_and_reported(server):
    first = await generate(server, prompt="random seed please", width=64, height=64)
    seed = int(first.headers["x-seed"])
    again = await generate(server, prompt="random seed please", seed=seed, width=64, height=64)
    assert again.content == first.content
    another = await generate(server, prompt="random seed please", width=64, height=64)
    assert another.headers["x-seed"] != first.headers["x-seed"]


async def test_r2_variant_writes_exactly_one_object(server, s3):
    before = set(s3.keys(server.bucket, "images/generated/"))
    response = await server.client.post("/v1/r2/images/generate", json={"prompt": "to the bucket", "seed": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    key = body["key"]
    assert key == f"images/generated/{body['job_id']}.png"
    assert body["seed"] == 3
    after = set(s3.keys(server.bucket, "images/generated/"))
    assert after - before == {key}
    stored = s3.client.get_object(Bucket=server.bucket, Key=key)
    assert stored["ContentType"] == "image/png"
    png_size(stored["Body"].read())


async def poll_statuses(server, status_url: str) -> tuple[list[str], dict]:
    statuses: list[str] = []
    for _ in range(1000):
        job = (await server.client.get(status_url)).json()
        if not statuses or statuses[-1] != job["status"]:
            statuses.append(job["status"])
        if job["status"] in ("succeeded", "failed"):
            return statuses, job
        await asyncio.sleep(0.01)
    raise AssertionError(f"job did not finish: {statuses}")


async def test_async_job_status_transitions_in_order(server, s3):
    response = await server.client.post(
        "/v1/jobs",
        json={
            "type": "image.generate",
            "params": {"prompt": "slow enough to watch", "width": 192, "height": 192, "steps": 4},
        },
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued"
    assert response.headers["location"] == accepted["status_url"]
    statuses, job = await poll_statuses(server, accepted["status_url"])
    # the 202 itself is the first observation; the processor may take the job before the first poll
    observed = [accepted["status"], *(status for status in statuses if status != "queued")]
    assert observed == ["queued", "running", "succeeded"]
    assert statuses[-2:] == ["running", "succeeded"]
    assert job["job_id"] == accepted["job_id"]
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert job["attempts"] == 1
    assert job["params"]["prompt"] == "slow enough to watch"
    result = job["result"]
    assert result["key"] == f"images/generated/{job['job_id']}.png"
    assert (result["width"], result["height"], result["steps"]) == (192, 192, 4)
    assert isinstance(result["seed"], int)
    assert job["error"] is None
    async with httpx.AsyncClient() as plain:
        download = await plain.get(result["url"])
    assert download.status_code == 200
    assert png_size(download.content) == (192, 192)


async def test_idempotency_key_retry_yields_one_job_and_one_object(server, s3):
    key = f"client-retry-{uuid.uuid4()}"
    body = {"type": "image.generate", "params": {"prompt": "only once", "seed": 11}}
    before = set(s3.keys(server.bucket, "images/generated/"))
    first = await server.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    second = await server.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] == second.json()["job_id"]
    _, job = await poll_statuses(server, first.json()["status_url"])
    assert job["status"] == "succeeded"
    third = await server.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert third.json() == {**first.json(), "status": "succeeded"}
    after = set(s3.keys(server.bucket, "images/generated/"))
    assert after - before == {job["result"]["key"]}

    reused = await server.client.post(
        "/v1/jobs",
        json={"type": "image.generate", "params": {"prompt": "something else"}},
        headers={"Idempotency-Key": key},
    )
    assert reused.status_code == 409
    assert reused.json()["code"] == "idempotency_key_reused"


async def test_an_idempotency_key_whose_record_expired_starts_a_new_job(server):
    """A finished record past JOB_RECORD_TTL_DAYS reads as absent (its key is free again) even before a processor's
    hourly sweep deletes it: the key starts a new job, which replaces the expired record."""
    key = f"expired-{uuid.uuid4()}"
    body = {"type": "image.generate", "params": {"prompt": "again", "seed": 12}}
    jobs = JobStore(server.services.store, server.services.settings.job_record_ttl_days)
    old = JobStore.new(job_id_for_idempotency_key("image.generate", key), "image.generate", {}, idempotency_key=key)
    long_ago = (datetime.now(tz=UTC) - timedelta(days=30)).isoformat().replace("+00:00", "Z")
    old.status, old.finished_at, old.result = "succeeded", long_ago, {"key": "images/generated/gone.png"}
    await jobs.create(old)
    assert await jobs.get(old.job_id) is None

    again = await server.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 202, again.text
    assert again.json()["job_id"] == old.job_id
    _, job = await poll_statuses(server, again.json()["status_url"])
    assert job["status"] == "succeeded"
    assert job["result"]["key"] != "images/generated/gone.png"


async def test_idempotency_key_on_the_sync_endpoints(server, s3):
    key = f"sync-{uuid.uuid4()}"
    first = await server.client.post("/v1/r2/images/generate", json={"prompt": "p"}, headers={"Idempotency-Key": key})
    second = await server.client.post("/v1/r2/images/generate", json={"prompt": "p"}, headers={"Idempotency-Key": key})
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    png_key = f"sync-png-{uuid.uuid4()}"
    png_first = await server.client.post(
        "/v1/images/generate", json={"prompt": "q"}, headers={"Idempotency-Key": png_key}
    )
    png_again = await server.client.post(
        "/v1/images/generate", json={"prompt": "q"}, headers={"Idempotency-Key": png_key}
    )
    assert png_first.status_code == png_again.status_code == 200
    assert png_first.content == png_again.content
    assert png_first.headers["x-job-id"] == png_again.headers["x-job-id"]


async def test_the_same_request_sent_at_once_with_its_key_waits_for_the_one_job(server, s3):
    """Requests that find their key's job still running (a client's retry after a lost connection, here four at
    once) wait for it as the first does and get its image; one job, one object."""
    key = f"at-once-{uuid.uuid4()}"
    body = {"prompt": "sent four times", "seed": 21, "width": 128, "height": 128, "steps": 3}
    before = set(s3.keys(server.bucket, "images/generated/"))
    answers = await asyncio.gather(
        *(server.client.post("/v1/images/generate", json=body, headers={"Idempotency-Key": key}) for _ in range(4))
    )
    assert [answer.status_code for answer in answers] == [200] * 4, [answer.text[:200] for answer in answers]
    assert len({answer.content for answer in answers}) == 1 and png_size(answers[0].content) == (128, 128)
    assert {answer.headers["x-job-id"] for answer in answers} == {job_id_for_idempotency_key("image.generate", key)}
    assert len(set(s3.keys(server.bucket, "images/generated/")) - before) == 1
    record = await JobStore(server.services.store, 7).get(answers[0].headers["x-job-id"])
    assert record is not None and record.attempts == 1


async def test_sync_wait_past_the_timeout_answers_202_with_the_job(make_settings):
    settings = make_settings(IMAGE_ENABLED="1", SYNC_TIMEOUT_SECONDS="0.1")
    slow = {"prompt": "too slow to wait for", "width": 192, "height": 192, "steps": 4}
    key = {"Idempotency-Key": f"slow-{uuid.uuid4()}"}
    async with running_server(settings) as server:
        response = await server.client.post("/v1/images/generate", json=slow, headers=key)
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["status_url"].endswith(f"/v1/jobs/{body['job_id']}")
        retry = await server.client.post("/v1/images/generate", json=slow, headers=key)
        assert retry.status_code == 202 and retry.json()["job_id"] == body["job_id"]  # waited as long, no longer
        _, job = await poll_statuses(server, body["status_url"])
        assert job["status"] == "succeeded"
        download = await server.client.get(job["result"]["url"])
        assert png_size(download.content) == (192, 192)
        finished = await server.client.post("/v1/images/generate", json=slow, headers=key)
        assert finished.status_code == 200 and finished.content == download.content


async def test_interactive_request_overtakes_a_queued_backlog(server):
    """With 200 index messages queued, a waiting generate request starts after at most the index batches in hand
    (up to three side by side, and one more that may start while the request is on its way), not after the
    backlog."""
    index = server.services.index
    batch = server.services.settings.image_search_batch_size
    large = base64.b64encode(encoded(31337, "PNG", size=(1400, 1400))).decode()
    start_count = await index.count()
    await publish_many(server.services.settings.amqp_url, IMAGE_INDEX, [{"data": large, "source": "backlog"}] * 200)
    await asyncio.sleep(0.3)
    before = await index.count() - start_count
    response = await generate(server, prompt="me first", seed=5, width=64, height=64)
    after = await index.count() - start_count
    assert response.status_code == 200
    assert before < 200 - 3 * batch, "the backlog drained before the request; make index jobs slower"
    assert after - before <= (PIPELINE_DEPTH + 1) * batch, (before, after)

    async def drained() -> bool:
        return await index.count() - start_count == 200

    await wait_until(drained, timeout=120)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        # blank to Python (\x1f, \x85) or to the document's pattern (\ufeff): blank to the server
        ({"prompt": "\x1f\x85\ufeff\u3000"}, "prompt"),
        ({"prompt": "x" * 100_000}, "prompt"),
        ({"prompt": "x", "seed": "42"}, "seed"),
        ({"prompt": "x", "seed": 4.2}, "seed"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": "x", "width": 7}, "width"),
        ({"prompt": "x", "width": 100000}, "width"),
        ({"prompt": "x", "height": 100}, "height"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "steps": 1000}, "steps"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "x", "sampler": "euler"}, "sampler"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/images/generate", "/v1/r2/images/generate", "/v1/jobs"])
async def test_bad_generation_requests(server, path, body, fragment):
    payload = {"type": "image.generate", "params": body} if path == "/v1/jobs" else body
    response = await server.client.post(path, json=payload)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["message"]


@pytest.mark.parametrize("path", ["/v1/images/generate", "/v1/r2/images/generate", "/v1/jobs"])
async def test_a_generation_over_the_pixel_step_budget_is_refused_before_it_is_queued(server, path):
    """The tiny profile's budget is 512 x 512 x 4: 2048 x 2048 at 100 steps is 1,600 times that."""
    body = {"prompt": "huge", "width": 2048, "height": 2048, "steps": 100}
    payload = {"type": "image.generate", "params": body} if path == "/v1/jobs" else body
    response = await server.client.post(path, json=payload)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "too_expensive"
    assert "IMAGE_MAX_PIXEL_STEPS" in response.json()["message"]


async def test_an_upstream_generation_over_the_budget_fails_without_running(server):
    job_id = str(uuid.uuid4())
    body = {"prompt": "huge", "width": 2048, "height": 2048, "steps": 100}
    await publish(server.services.settings.amqp_url, "image.generate", body, message_id=job_id)

    async def failed() -> bool:
        job = (await server.client.get(f"/v1/jobs/{job_id}")).json()
        return job.get("status") == "failed"

    await wait_until(failed, timeout=30)
    job = (await server.client.get(f"/v1/jobs/{job_id}")).json()
    assert job["error"]["code"] == "too_expensive"
    assert not await server.services.store.exists(f"images/generated/{job_id}.png")


async def test_unknown_job_type_and_id(server):
    response = await server.client.post("/v1/jobs", json={"type": "image.teleport", "params": {}})
    assert response.status_code == 400
    assert response.json()["code"] == "unknown_job_type"
    assert "image.generate" in response.json()["message"]
    for job_id in (str(uuid.uuid4()), "nope"):
        missing = await server.client.get(f"/v1/jobs/{job_id}")
        assert missing.status_code == 404
        assert missing.json()["code"] == "job_not_found"


async def test_generation_disabled(make_settings):
    async with running_server(make_settings(IMAGE_ENABLED="0")) as server:
        assert server.processor is not None and server.processor.runtime.generator is None
        assert "image_model" not in (await server.client.get("/readyz")).json()["checks"]
        for path, body in [
            ("/v1/images/generate", {"prompt": "x"}),
            ("/v1/r2/images/generate", {"prompt": "x"}),
            ("/v1/jobs", {"type": "image.generate", "params": {"prompt": "x"}}),
        ]:
            response = await server.client.post(path, json=body)
            assert response.status_code == 503
            assert response.json()["code"] == "feature_disabled"
            assert "IMAGE_ENABLED" in response.json()["message"]


async def test_r2_endpoint_without_r2(make_settings):
    async with running_server(make_settings(IMAGE_ENABLED="1")) as server:
        refused = await server.client.post("/v1/r2/images/generate", json={"prompt": "x"})
        assert refused.status_code == 503
        assert refused.json()["code"] == "r2_disabled"
        works = await server.client.post("/v1/images/generate", json={"prompt": "x", "seed": 1})
        assert works.status_code == 200
        assert png_size(works.content) == (64, 64)


@pytest.fixture
def record_reads(monkeypatch) -> list[str]:
    """The job ids whose records are read back from the store (JobStore.load), in order."""
    reads: list[str] = []
    real = JobStore.load

    async def load(self, job_id):
        reads.append(job_id)
        return await real(self, job_id)

    monkeypatch.setattr(JobStore, "load", load)
    return reads


async def test_a_first_delivery_uses_the_record_it_carries_instead_of_reading_it(server, record_reads):
    response = await server.client.post("/v1/images/generate", json={"prompt": "carried", "seed": 1})
    assert response.status_code == 200
    job_id = response.headers["x-job-id"]
    assert job_id not in record_reads
    job = (await server.client.get(f"/v1/jobs/{job_id}")).json()
    assert (job["status"], job["attempts"]) == ("succeeded", 1)


@pytest.mark.parametrize("attempts", [None, 1], ids=["first-delivery", "retry"])
async def test_a_stale_carried_record_or_a_retry_still_ends_in_the_right_record(server, record_reads, attempts):
    """A carried record whose version is not the stored one costs a re-read, never a wrong record; a retry (which
    the record may have moved on since) reads the stored record instead of trusting what it carries."""
    job_id = str(uuid.uuid4())
    carried = JobStore.new(job_id, "image.generate", {"prompt": "stale"})
    headers = record_headers(carried, "not-the-stored-version")
    if attempts is not None:
        headers[ATTEMPTS_HEADER] = attempts
    await publish(
        server.services.settings.amqp_url, "image.generate", {"prompt": "stale"}, message_id=job_id, headers=headers
    )

    async def stored() -> bool:
        return await server.services.store.exists(f"images/generated/{job_id}.png")

    async def finished() -> bool:
        return (await server.client.get(f"/v1/jobs/{job_id}")).json().get("status") == "succeeded"

    await wait_until(stored, timeout=30)
    assert job_id in record_reads  # by the processor: the API has not been asked yet
    await wait_until(finished, timeout=30)


async def test_the_answer_leaves_before_the_output_and_record_are_flushed_and_the_ack_waits_for_them(
    make_env, rabbit, monkeypatch
):
    """On the embedded store, a success's PNG and record are seen at once (read right after the answer, they are
    there) and flushed to the disk after the answer; the message is acked only once both are flushed. While
    flushing fails the message is handed back; its redelivery flushes and acks it, and the job is not run again."""
    env = make_env(IMAGE_ENABLED="1")
    settings = Settings.from_env(env)
    broken, answered, flushes = [True], [False], []
    real_flush = LocalStore.flush

    async def flush(store: LocalStore, key: str) -> None:
        if key.startswith(("jobs/", "images/generated/")):
            flushes.append((key.split("/")[0], answered[0]))
            if broken[0]:
                raise StorageUnavailableError("the disk is not answering")
        await real_flush(store, key)

    monkeypatch.setattr(LocalStore, "flush", flush)
    async with running_server(settings) as server:
        response = await generate(server, prompt="flushed after the answer", seed=8, width=64, height=64)
        answered[0] = True
        assert response.status_code == 200, response.text
        job_id = response.headers["x-job-id"]
        job = (await server.client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "succeeded"
        assert (await server.services.store.get(f"images/generated/{job_id}.png")).data == response.content
        # the answer came back while neither could be flushed
        assert {("jobs", False), ("images", False)} <= set(flushes)
        await wait_until(lambda: len(flushes) >= 8, timeout=30)
        assert rabbit.queue_counts(env["VHOST"])["ams.image"] == (0, 1)  # not acked
        broken[0] = False
        await wait_until(lambda: rabbit.queue_counts(env["VHOST"])["ams.image"] == (0, 0), timeout=30)
        assert {("jobs", True), ("images", True)} <= set(flushes)
        job = (await server.client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "succeeded" and job["attempts"] == 1


async def test_a_job_failed_on_a_store_that_stayed_down_is_started_afresh_by_its_key(make_settings, monkeypatch):
    """A generation whose output could not be stored through all its attempts fails with storage_unavailable: the
    waiting client gets 503 with Retry-After, and retrying with the same Idempotency-Key, as told, runs the job
    again under its id (a retry with other parameters is still a 409)."""
    settings = make_settings(IMAGE_ENABLED="1", MAX_ATTEMPTS="1")
    async with running_server(settings) as server:
        store = server.processor.runtime.store
        real_put, down = store.put, True

        async def put(key: str, *args: object, **options: object) -> str:
            if down and key.startswith("images/generated/"):
                raise StorageUnavailableError("the disk is gone for this test")
            return await real_put(key, *args, **options)

        monkeypatch.setattr(store, "put", put)
        key = {"Idempotency-Key": f"store-down-{uuid.uuid4()}"}
        body = {"prompt": "kept trying", "seed": 3, "width": 64, "height": 64, "steps": 1}
        failed = await generate_with(server, body, key)
        assert (failed.status_code, failed.json()["code"]) == (503, "storage_unavailable"), failed.text
        assert int(failed.headers["retry-after"]) > 0
        job_id = job_id_for_idempotency_key("image.generate", key["Idempotency-Key"])
        assert (await server.client.get(f"/v1/jobs/{job_id}")).json()["status"] == "failed"

        other = await generate_with(server, {**body, "seed": 4}, key)
        assert (other.status_code, other.json()["code"]) == (409, "idempotency_key_reused")
        down = False
        retried = await generate_with(server, body, key)
        assert retried.status_code == 200, retried.text
        assert retried.headers["x-job-id"] == job_id
        assert png_size(retried.content) == (64, 64)
        assert (await server.client.get(f"/v1/jobs/{job_id}")).json()["status"] == "succeeded"


async def test_a_generation_the_device_has_no_memory_for_is_retried_then_a_503(make_settings, monkeypatch):
    """The model running out of device memory is a transient failure (device_memory_unavailable), not a crash:
    the job is retried through the delay queue and succeeds once it fits; when it never fits in its attempts, the
    waiting client gets 503 with Retry-After, and its Idempotency-Key starts the job afresh."""
    settings = make_settings(IMAGE_ENABLED="1", MAX_ATTEMPTS="2")
    async with running_server(settings) as server:
        generator = server.processor.runtime.generator
        pipeline, short = generator._pipeline, [1]

        def short_of_memory(**kwargs: object) -> object:
            if short[0]:
                short[0] -= 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return pipeline(**kwargs)

        monkeypatch.setattr(generator, "_pipeline", short_of_memory)
        body = {"prompt": "fits the second time", "seed": 8, "width": 64, "height": 64, "steps": 1}
        fitted = await generate_with(server, body, {})
        assert fitted.status_code == 200, fitted.text
        assert png_size(fitted.content) == (64, 64)
        job = (await server.client.get(f"/v1/jobs/{fitted.headers['x-job-id']}")).json()
        assert (job["status"], job["attempts"]) == ("succeeded", 2)

        short[0] = 2
        key = {"Idempotency-Key": f"no-memory-{uuid.uuid4()}"}
        failed = await generate_with(server, {**body, "prompt": "never fits"}, key)
        assert (failed.status_code, failed.json()["code"]) == (503, "device_memory_unavailable"), failed.text
        assert "ran out of memory" in failed.json()["message"]
        assert int(failed.headers["retry-after"]) > 0
        job_id = job_id_for_idempotency_key("image.generate", key["Idempotency-Key"])
        job = (await server.client.get(f"/v1/jobs/{job_id}")).json()
        assert (job["status"], job["error"]["code"], job["attempts"]) == ("failed", "device_memory_unavailable", 2)
        again = await generate_with(server, {**body, "prompt": "never fits"}, key)
        assert again.status_code == 200, again.text
        assert again.headers["x-job-id"] == job_id


async def generate_with(server, body: dict, headers: dict) -> httpx.Response:
    return await server.client.post("/v1/images/generate", json=body, headers=headers)


async def test_an_idempotency_key_used_again_after_its_record_went_makes_a_new_output(server, s3):
    """Without OUTPUT_TTL_DAYS an output outlives its job's record, and the job id (so the output's key) comes from
    the Idempotency-Key: a request that uses the key again once the record is gone (the sweep deleted it) gets the
    image of its own parameters, not the one the key's earlier job left."""
    key = {"Idempotency-Key": f"used-again-{uuid.uuid4()}"}
    first = await generate_with(server, {"prompt": "a red square", "seed": 5, "steps": 1}, key)
    assert first.status_code == 200, first.text
    job_id = first.headers["x-job-id"]
    await JobStore(server.services.store, 1).delete(job_id)  # as the sweep does once the record expired

    second = await generate_with(server, {"prompt": "a blue circle", "seed": 6, "steps": 1}, key)
    assert second.status_code == 200, second.text
    assert second.headers["x-job-id"] == job_id
    fresh = await generate(server, prompt="a blue circle", seed=6, steps=1)
    assert second.content == fresh.content != first.content
    stored = await server.services.store.get(f"images/generated/{job_id}.png")
    assert stored.data == second.content
