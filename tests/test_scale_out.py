"""The production topology in one test process: an API alone, and processors per capability on one broker, each
with its own connection, as separate services would be."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from contract.jobs import JobStore, now_iso, record_key
from contract.messages import IMAGE_GENERATE
from infra.broker import queue_depths
from infra.settings import Settings
from infra.startup import StartupError
from infra.storage import PreconditionFailedError, open_store
from launcher import OneProcess
from processor.health import create_health_app
from processor.runtime import Runtime
from processor.service import ProcessorService
from tests.support.amqp import publish, wait_until
from tests.support.backdate import written_days_ago
from tests.support.images import encoded
from tests.support.process import served_process
from tests.support.server import running_server

ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def processors(env: dict[str, str], *capabilities: str) -> AsyncIterator[list[ProcessorService]]:
    """One processor per entry of `capabilities` (each a PROCESSOR_CAPABILITIES value), started in order."""
    started: list[ProcessorService] = []
    try:
        for value in capabilities:
            started.append(await ProcessorService.start(Settings.from_env({**env, "PROCESSOR_CAPABILITIES": value})))
        yield started
    finally:
        for service in reversed(started):
            await service.stop()


async def test_processors_with_different_capabilities_each_get_only_their_jobs(make_env, rabbit):
    env = make_env(IMAGE_ENABLED="1")
    async with processors(env, "index", "image") as (indexer, generator):
        assert indexer.runtime.generator is None and generator.runtime.clip is None
        assert set(await indexer.readiness()) == {"processor", "clip_model", "qdrant"}
        assert set(await generator.readiness()) == {"processor", "image_model"}
        async with running_server(Settings.from_env(env), with_processor=False) as api:
            assert api.processor is None
            assert api.services.queries is not None and not api.services.queries.image_tower
            ready = (await api.client.get("/readyz")).json()
            assert ready["status"] == "ready" and "processor" not in ready["checks"]

            generated = await api.client.post("/v1/images/generate", json={"prompt": "two services", "seed": 5})
            assert generated.status_code == 200, generated.text
            uploaded = await api.client.post("/v1/images?wait=true", files={"file": ("a.png", encoded(3), "image/png")})
            assert uploaded.status_code == 201, uploaded.text
            # search by example: the API holds the text tower only, so an indexing processor embeds the example
            found = await api.client.post(
                "/v1/images/search/by-image", files={"file": ("q.png", encoded(3), "image/png")}
            )
            assert found.status_code == 200, found.text
            assert found.json()["results"][0]["id"] == uploaded.json()["id"]
            assert (await api.client.post("/v1/images/search", json={"query": "a cat"})).status_code == 200

            counts = rabbit.queue_counts(env["VHOST"])
            assert counts["ams.dead"] == (0, 0), "nothing is refused as feature_disabled"
            assert counts["ams.image"] == counts["ams.index"] == counts["ams.voice"] == (0, 0)
            consumers = {name: found for name, (_, found) in (await _depths(api)).items() if name.startswith("ams.")}
            assert consumers["ams.index"] == 1 and consumers["ams.image"] == 1 and consumers["ams.voice"] == 0


async def _depths(api) -> dict[str, tuple[int, int]]:
    return await queue_depths(api.services.connection)


async def test_competing_image_processors_run_each_job_once(make_env, rabbit):
    env = make_env(IMAGE_ENABLED="1", IMAGE_SEARCH_ENABLED="0")
    async with (
        processors(env, "image", "image") as pair,
        running_server(Settings.from_env(env), with_processor=False) as api,
    ):
        assert (await _depths(api))["ams.image"][1] == 2
        queued = [
            await api.client.post(
                "/v1/jobs", json={"type": "image.generate", "params": {"prompt": f"job {n}", "seed": n}}
            )
            for n in range(20)
        ]
        assert all(response.status_code == 202 for response in queued)
        job_ids = [response.json()["job_id"] for response in queued]

        async def all_done() -> bool:
            states = [(await api.client.get(f"/v1/jobs/{job_id}")).json()["status"] for job_id in job_ids]
            return all(state == "succeeded" for state in states)

        await wait_until(all_done, timeout=120)
        store = pair[0].runtime.store
        outputs = sorted([info.key async for info in store.list("images/generated/")])
        assert outputs == sorted(f"images/generated/{job_id}.png" for job_id in job_ids)
        for job_id in job_ids:
            job = (await api.client.get(f"/v1/jobs/{job_id}")).json()
            assert job["attempts"] == 1, job
        assert rabbit.queue_counts(env["VHOST"])["ams.dead"] == (0, 0)


async def test_an_api_alone_refuses_to_start_without_the_index_owner(make_env):
    with pytest.raises(StartupError) as refused:
        await OneProcess.start(Settings.from_env(make_env()), with_processor=False)
    assert "python -m processor" in str(refused.value) and "QDRANT_URL" in str(refused.value)


async def test_a_job_published_twice_to_competing_processors_leaves_one_output(make_env, rabbit):
    """Two deliveries of each job (an upstream publishing twice) reach two processors at the same time: the
    conditional writes leave one output object and one succeeded record per job."""
    env = make_env(IMAGE_ENABLED="1", IMAGE_SEARCH_ENABLED="0")
    async with processors(env, "image", "image") as pair:
        job_ids = [str(uuid.uuid4()) for _ in range(6)]
        for job_id in job_ids:
            for _ in range(2):
                await publish(env["AMQP_URL"], IMAGE_GENERATE, {"prompt": "twice", "seed": 3}, message_id=job_id)
        jobs = JobStore(pair[0].runtime.store, 7)

        async def all_settled() -> bool:
            records = [await jobs.get(job_id) for job_id in job_ids]
            settled = all(record is not None and record.status == "succeeded" for record in records)
            return settled and rabbit.queue_counts(env["VHOST"])["ams.image"] == (0, 0)

        await wait_until(all_settled, timeout=120)
        store = pair[0].runtime.store
        outputs = sorted([info.key async for info in store.list("images/generated/")])
        assert outputs == sorted(f"images/generated/{job_id}.png" for job_id in job_ids)
        assert rabbit.queue_counts(env["VHOST"])["ams.dead"] == (0, 0)


async def test_a_redelivery_after_a_crash_keeps_the_first_output_and_moves_the_record_forward(make_env, rabbit):
    """What a processor that died mid-job leaves (its output stored, the record at running) and a late write from
    it (a zombie with the old version) cannot make a second object or move the record back."""
    env = make_env(IMAGE_ENABLED="1", IMAGE_SEARCH_ENABLED="0")
    async with processors(env, "image") as (survivor,):
        store = survivor.runtime.store
        jobs = JobStore(store, 7)
        job_id = str(uuid.uuid4())
        first_png = encoded(9, "PNG")
        await store.put(f"images/generated/{job_id}.png", first_png, "image/png", if_none_match=True)
        record = JobStore.new(job_id, IMAGE_GENERATE, {"prompt": "crash"})
        record.status, record.attempts = "running", 1
        stale = await jobs.create(record)

        await publish(env["AMQP_URL"], IMAGE_GENERATE, {"prompt": "crash", "seed": 1}, message_id=job_id)

        async def succeeded() -> bool:
            found = await jobs.get(job_id)
            return found is not None and found.status == "succeeded"

        await wait_until(succeeded, timeout=60)
        assert (await store.get(f"images/generated/{job_id}.png")).data == first_png
        assert [info.key async for info in store.list("images/generated/")] == [f"images/generated/{job_id}.png"]
        done = await jobs.get(job_id)
        assert done.result["key"] == f"images/generated/{job_id}.png" and done.result["size"] == len(first_png)

        zombie = JobStore.new(job_id, IMAGE_GENERATE, {"prompt": "crash"})
        zombie.status = "failed"
        with pytest.raises(PreconditionFailedError):
            await jobs.update(zombie, stale)
        assert (await jobs.get(job_id)).status == "succeeded"


async def test_finished_job_records_expire(make_env):
    settings = Settings.from_env(make_env(JOB_RECORD_TTL_DAYS="1"))
    store = await open_store(settings)
    try:
        jobs = JobStore(store, settings.job_record_ttl_days)
        old, recent, waiting = (JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, {}) for _ in range(3))
        two_days_ago = (datetime.now(tz=UTC) - timedelta(days=2)).isoformat().replace("+00:00", "Z")
        old.status, old.finished_at = "succeeded", two_days_ago
        recent.status, recent.finished_at = "failed", now_iso()
        waiting.created_at = two_days_ago
        for record in (old, recent, waiting):
            await jobs.create(record)
        written_days_ago(settings.local_storage_dir, record_key(old.job_id), 2)
        assert await jobs.get(old.job_id) is None, "an expired record reads as absent"
        assert await jobs.get(recent.job_id) is not None and await jobs.get(waiting.job_id) is not None
        assert (await jobs.sweep()).records == 1
        assert not await store.exists(record_key(old.job_id))
        assert await store.exists(record_key(recent.job_id))
    finally:
        await store.close()


async def test_a_sweep_reads_only_the_records_written_long_enough_ago(make_env, monkeypatch):
    """The listing says when each record was last written: one written within JOB_RECORD_TTL_DAYS (less an hour
    for clocks) cannot have expired, and is not read; so a sweep reads what came due, not every record kept."""
    settings = Settings.from_env(make_env(JOB_RECORD_TTL_DAYS="1"))
    store = await open_store(settings)
    try:
        jobs = JobStore(store, settings.job_record_ttl_days)
        finished = [JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, {}) for _ in range(20)]
        for record in finished:
            record.status, record.finished_at = "succeeded", now_iso()
            await jobs.create(record)
        written_days_ago(settings.local_storage_dir, record_key(finished[0].job_id), 2)
        read: list[str] = []
        get = store.get

        async def counted(key: str, *args, **kwargs):
            read.append(key)
            return await get(key, *args, **kwargs)

        monkeypatch.setattr(store, "get", counted)
        await jobs.sweep()
        assert read == [record_key(finished[0].job_id)]
    finally:
        await store.close()


async def test_python_m_api_alone_serves_generate_and_search_through_processors_elsewhere(make_env, tmp_path):
    """`python -m api` as its own process; the indexing and generating processor runs in this test's process and
    owns the embedded index, which the API uses over the engine's socket."""
    env = make_env(IMAGE_ENABLED="1")
    async with processors(env, "index,image") as (processor,):
        async with served_process("api", env, tmp_path / "api.log") as api:
            client = api.client
            checks = (await client.get("/readyz")).json()["checks"]
            assert set(checks) == {"broker", "storage", "clip_model", "qdrant"}, "what the API alone owns"
            generated = await client.post("/v1/images/generate", json={"prompt": "elsewhere", "seed": 8})
            assert generated.status_code == 200, generated.text
            assert generated.content.startswith(b"\x89PNG")
            uploaded = await client.post("/v1/images", files={"file": ("u.png", encoded(4), "image/png")})
            assert uploaded.status_code == 201, uploaded.text
            found = await client.post("/v1/images/search/by-image", files={"file": ("q.png", encoded(4), "image/png")})
            assert found.json()["results"][0]["id"] == uploaded.json()["id"]
            api.process.terminate()
            assert api.process.wait(timeout=30) == 0

        health = create_health_app(processor)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=health), base_url="http://processor") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200
            assert set(ready.json()["checks"]) == {
                "broker",
                "storage",
                "processor",
                "clip_model",
                "qdrant",
                "image_model",
            }, "what this processor owns"
            metrics = (await client.get("/metrics")).text
            assert 'ams_jobs_total{outcome="succeeded",type="image.generate"}' in metrics
            assert 'ams_queue_consumers{queue="ams.image"} 1.0' in metrics


async def test_search_by_image_without_an_indexing_processor_says_so(make_env):
    """The index's owner runs, but no processor consumes ams.index: an API alone answers at once, not after the
    sync timeout."""
    settings = Settings.from_env(make_env())
    owner = await Runtime.open(settings, capabilities=("index",))
    try:
        async with running_server(settings, with_processor=False) as api:
            found = await api.client.post(
                "/v1/images/search/by-image", files={"file": ("q.png", encoded(4), "image/png")}
            )
            assert found.status_code == 503
            assert found.json()["code"] == "index_unavailable"
            assert "PROCESSOR_CAPABILITIES" in found.json()["message"]
            assert (await api.client.post("/v1/images/search", json={"query": "text still works"})).status_code == 200
    finally:
        await owner.close()
