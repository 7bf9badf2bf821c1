"""The consumer on its own: batching, idempotency, dead letters, crash recovery."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from contract.bucket_events import BUCKET_EVENT
from contract.image_ids import thumbnail_key
from contract.jobs import (
    QUEUED_RECORD_HEADER,
    QUEUED_VERSION_HEADER,
    READ_AHEAD,
    RECORD_HEADER,
    JobStore,
    queued_record,
    record_key,
)
from contract.messages import IMAGE_GENERATE, IMAGE_INDEX, ImageGenerateV1
from contract.metrics import REGISTRY
from infra.settings import Settings
from infra.storage import StorageUnavailableError, open_store
from infra.storage.local import LocalStore
from infra.vectors.edge.client import EdgeIndex
from processor.handlers.base import Job
from processor.outcomes import Succeeded
from processor.runtime import Runtime
from processor.service import build_consumer
from processor.settler import Settler
from processor.tracking import JobTracker
from tests.support.amqp import drain, publish, wait_until
from tests.support.images import encoded
from tests.support.rabbitmq import free_port
from tests.support.s3 import S3Process


def vhost_of(settings: Settings) -> str:
    return settings.amqp_url.rsplit("/", 1)[1]


@contextlib.asynccontextmanager
async def consuming(settings: Settings) -> AsyncIterator[Runtime]:
    """The processor's runtime with its consumer started; stopped and closed after."""
    runtime = await Runtime.open(settings)
    consumer = build_consumer(runtime)
    await consumer.start()
    try:
        yield runtime
    finally:
        await consumer.stop()
        await runtime.close()


async def drain_index_queue(runtime: Runtime, rabbit, settings: Settings) -> None:
    """Start a consumer on what is queued (so that it is batched together), stop it once ams.index is empty."""
    consumer = build_consumer(runtime)
    await consumer.start()
    try:
        await wait_until(lambda: rabbit.queue_counts(vhost_of(settings))["ams.index"] == (0, 0), timeout=20)
    finally:
        await consumer.stop()


def index_message(seed: int, image_id: str | None = None) -> dict:
    body = {"data": base64.b64encode(encoded(seed)).decode(), "source": "test"}
    if image_id:
        body["image_id"] = image_id
    return body


async def test_queued_index_messages_are_embedded_in_batches(make_settings, rabbit):
    """Ten images and one file that is not an image, queued: a few forward passes, and the bad one dead-letters
    alone."""
    settings = make_settings(IMAGE_SEARCH_BATCH_SIZE="4")
    runtime = await Runtime.open(settings)
    try:
        ids = [await publish(settings.amqp_url, IMAGE_INDEX, index_message(seed)) for seed in range(5)]
        not_an_image = {"data": base64.b64encode(b"%PDF-1.4 not an image").decode(), "source": "test"}
        bad = await publish(settings.amqp_url, IMAGE_INDEX, not_an_image)
        ids += [await publish(settings.amqp_url, IMAGE_INDEX, index_message(seed)) for seed in range(5, 10)]
        batch_sizes: list[int] = []
        real_embed = runtime.clip.embed_prepared

        def spy(inputs):
            batch_sizes.append(len(inputs))
            return real_embed(inputs)

        runtime.clip.embed_prepared = spy
        consumer = build_consumer(runtime)
        await consumer.start()
        try:
            await wait_until(lambda: _count_is(runtime, 10))
        finally:
            await consumer.stop()
        assert sum(batch_sizes) == 10
        assert max(batch_sizes) == 4
        assert len(batch_sizes) <= 4
        assert set((await runtime.index.get_many(ids)).keys()) == set(ids)
        await wait_until(lambda: rabbit.queue_counts(vhost_of(settings))["ams.dead"][0] == 1)
        [dead] = await drain(settings.amqp_url, "ams.dead")
        assert (dead.message_id, dead.headers["x-ams-reason-code"]) == (bad, "not_an_image")
    finally:
        await runtime.close()


async def _count_is(runtime: Runtime, expected: int) -> bool:
    return await runtime.index.count() == expected


async def test_redelivered_message_creates_one_object_and_one_point(make_settings, rabbit):
    settings = make_settings()
    async with consuming(settings) as runtime:
        message_id = str(uuid.uuid4())
        for _ in range(3):
            await publish(settings.amqp_url, IMAGE_INDEX, index_message(7), message_id=message_id)
        await wait_until(lambda: rabbit.queue_counts(vhost_of(settings))["ams.index"] == (0, 0))
        keys = [info.key async for info in runtime.store.list("images/originals/")]
        assert keys == [f"images/originals/{message_id}.png"]
        assert await runtime.index.count() == 1


@pytest.mark.parametrize(
    ("body", "content_type", "message_type", "code"),
    [
        (b"{not json", "application/json", IMAGE_INDEX, "malformed_body"),
        (b'{"data": "aGVsbG8="}', "application/json", "image.unknown", "unknown_type"),
        (b'{"source": "x"}', "application/json", IMAGE_INDEX, "schema_violation"),
        (b'{"data": "JVBERi0xLjQKJcOkw7zDtsOf"}', "application/json", IMAGE_INDEX, "not_an_image"),
        (b"data", "text/plain", IMAGE_INDEX, "unsupported_content_type"),
        (b'{"key": "../outside/the/bucket.png"}', "application/json", IMAGE_INDEX, "invalid_key"),
        (b'{"source": "caf\xc3\x28"}', "application/json", IMAGE_INDEX, "malformed_body"),  # not UTF-8
        (b"[" * 100_000 + b"]" * 100_000, "application/json", BUCKET_EVENT, "malformed_body"),  # too deep for msgspec
    ],
    ids=["not-json", "unknown-type", "schema", "not-an-image", "text-plain", "outside-key", "not-utf8", "deep-event"],
)
async def test_poison_messages_are_dead_lettered_at_once(make_settings, rabbit, body, content_type, message_type, code):
    """Counted under their type, or `unknown` for a type no processor knows (a publisher's every typo would be a
    metric series of its own)."""
    settings = make_settings()
    label = {"type": "unknown" if code == "unknown_type" else message_type, "outcome": "dead_lettered"}
    before = REGISTRY.get_sample_value("ams_jobs_total", label) or 0
    async with consuming(settings) as runtime:
        message_id = await publish(settings.amqp_url, message_type, body, content_type=content_type)
        await wait_until(lambda: (REGISTRY.get_sample_value("ams_jobs_total", label) or 0) == before + 1, timeout=10)
        await wait_until(lambda: rabbit.queue_counts(vhost_of(settings)).get("ams.dead", (0, 0))[0] == 1)
        [dead] = await drain(settings.amqp_url, "ams.dead")
        assert dead.message_id == message_id
        assert dead.body == body
        assert dead.headers["x-ams-reason-code"] == code
        assert dead.headers["x-ams-reason"]
        assert dead.headers["x-ams-attempts"] == 1
        assert dead.headers["x-ams-routing-key"] == message_type
        assert await runtime.index.count() == 0
        assert rabbit.queue_counts(vhost_of(settings))["ams.index"] == (0, 0)


@pytest.mark.parametrize(
    ("broken", "headers"),
    [("processor.consumer.decode_job", {}), ("processor.consumer._carried", {RECORD_HEADER: True})],
    ids=["reading-the-message", "the-bookkeeping-around-the-handler"],
)
async def test_an_unforeseen_failure_dead_letters_the_message_instead_of_leaving_it_unacked(
    make_settings, rabbit, monkeypatch, broken, headers
):
    def bug(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(broken, bug)
    settings = make_settings()
    async with consuming(settings):
        message_id = await publish(settings.amqp_url, IMAGE_INDEX, index_message(3), headers=headers)
        await wait_until(lambda: rabbit.queue_counts(vhost_of(settings)).get("ams.dead", (0, 0))[0] == 1)
        [dead] = await drain(settings.amqp_url, "ams.dead")
        assert (dead.message_id, dead.headers["x-ams-reason-code"]) == (message_id, "internal_error")
        assert "a bug" in dead.headers["x-ams-reason"]
        assert rabbit.queue_counts(vhost_of(settings))["ams.index"] == (0, 0)


async def test_a_malformed_attempts_header_counts_as_a_first_attempt_and_holds_up_no_batch_mate(make_settings, rabbit):
    """`x-ams-attempts` is the processor's own header; a publisher that sets it to something that is not a whole
    number gets its job run as a first attempt, and the messages batched with it are settled as ever."""
    settings = make_settings()
    runtime = await Runtime.open(settings)
    try:
        ids = [
            await publish(settings.amqp_url, IMAGE_INDEX, index_message(20 + seed), headers=headers)
            for seed, headers in enumerate([{}, {"x-ams-attempts": "two"}, {}])
        ]
        await drain_index_queue(runtime, rabbit, settings)
        assert set(await runtime.index.get_many(ids)) == set(ids)
        assert rabbit.queue_counts(vhost_of(settings)).get("ams.dead", (0, 0))[0] == 0
    finally:
        await runtime.close()


async def test_a_message_whose_settling_fails_unforeseen_is_handed_back_and_spares_its_batch_mates(
    make_settings, rabbit, monkeypatch
):
    settings = make_settings()
    runtime = await Runtime.open(settings)
    try:
        ids = [await publish(settings.amqp_url, IMAGE_INDEX, index_message(30 + seed)) for seed in range(3)]
        settled: list[str] = []
        real_settle = Settler.settle

        async def settle(self: Settler, message, job, *args: object) -> None:
            settled.append(job.message_id)
            if settled.count(ids[0]) == 1 and job.message_id == ids[0]:
                raise RuntimeError("a bug")
            await real_settle(self, message, job, *args)

        monkeypatch.setattr(Settler, "settle", settle)
        await drain_index_queue(runtime, rabbit, settings)
        assert sorted(settled) == sorted([ids[0], *ids])  # the first twice: handed back, then settled
        assert set(await runtime.index.get_many(ids)) == set(ids)
        assert rabbit.queue_counts(vhost_of(settings)).get("ams.dead", (0, 0))[0] == 0
    finally:
        await runtime.close()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"data": "JVBERi0xLjQKJcOkw7zDtsOf"}, "not_an_image"),
        ({"source": "no image at all"}, "schema_violation"),
    ],
    ids=["failed-by-its-handler", "refused-before-it-ran"],
)
async def test_a_final_failure_whose_record_cannot_be_written_comes_again_and_is_recorded(
    make_settings, rabbit, monkeypatch, body, code
):
    """The store refuses the failed record for longer than the in-process retries: the message is neither
    dead-lettered nor acked with its record left unfinished; it is handed back, and its next delivery records the
    failure, then dead-letters it."""
    refused: list[str] = []
    real_update = JobStore.update

    async def update(self: JobStore, record, etag: str, **options: bool) -> str:
        if record.status == "failed" and len(refused) < 4:  # every try of one delivery's write
            refused.append(record.job_id)
            raise StorageUnavailableError("the store blinked")
        return await real_update(self, record, etag, **options)

    monkeypatch.setattr(JobStore, "update", update)
    settings = make_settings()
    async with consuming(settings) as runtime:
        jobs = JobStore(runtime.store, ttl_days=1)
        job_id = str(uuid.uuid4())
        await jobs.create(JobStore.new(job_id, IMAGE_INDEX, {}))
        await publish(settings.amqp_url, IMAGE_INDEX, body, message_id=job_id, headers={RECORD_HEADER: True})
        await wait_until(lambda: rabbit.queue_counts(vhost_of(settings)).get("ams.dead", (0, 0))[0] == 1)
        [dead] = await drain(settings.amqp_url, "ams.dead")
        assert (dead.message_id, dead.headers["x-ams-reason-code"]) == (job_id, code)
        assert refused == [job_id] * 4
        record = await jobs.get(job_id)
        assert record is not None and (record.status, record.error and record.error.code) == ("failed", code)


DEEP_RECORD = (
    '{"job_id": "x", "type": "image.index", "status": "queued", "created_at": "t", "updated_at": "t", '
    '"params": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"
)


async def test_a_job_record_too_deep_or_not_utf8_reads_as_none(tmp_path):
    store = LocalStore(tmp_path)
    jobs = JobStore(store, ttl_days=1)
    for job_id, data in (("deep", DEEP_RECORD.encode()), ("bytes", b'{"job_id": "\xff"}')):
        await store.put(record_key(job_id), data, "application/json")
        assert await jobs.load(job_id) is None
    assert queued_record({QUEUED_RECORD_HEADER: DEEP_RECORD, QUEUED_VERSION_HEADER: "v"}) is None


async def test_every_stored_record_is_read_beyond_one_read_ahead(tmp_path):
    """`stored` reads the records READ_AHEAD at a time: all of them come, each once, an unreadable one left out."""
    store = LocalStore(tmp_path)
    jobs = JobStore(store, ttl_days=1)
    ids = {f"job-{number:03}" for number in range(2 * READ_AHEAD + 5)}
    for job_id in ids:
        await jobs.create(JobStore.new(job_id, IMAGE_GENERATE, {}))
    await store.put(record_key("deep"), DEEP_RECORD.encode(), "application/json")
    read = [(key, record.job_id) async for key, record, _ in jobs.stored()]
    assert sorted(job_id for _, job_id in read) == sorted(ids)
    assert all(key == record_key(job_id) for key, job_id in read)


async def test_the_running_mark_is_a_background_write_and_the_outcome_is_not(tmp_path):
    """The mark is written beside the model and nobody waits on it: a store that writes small records on the event
    loop writes it in a thread, leaving the loop to the job's own steps; the succeeded record is awaited by the
    requester and takes the short way."""
    store = LocalStore(tmp_path)
    writes: list[tuple[str, bool]] = []
    real_put = store.put

    async def put(key, data, content_type, **options):
        writes.append((json.loads(data)["status"], options.get("background", False)))
        return await real_put(key, data, content_type, **options)

    store.put = put
    tracker = JobTracker(JobStore(store, ttl_days=1))
    job = Job(message_id="j1", message_type=IMAGE_GENERATE, payload=ImageGenerateV1(prompt="p"), priority=0)
    tracked = await tracker.load(job)
    tracker.mark_running(tracked, 1)
    assert await tracker.succeeded(tracked, Succeeded({"id": "x"}), 1)
    assert writes == [("running", True), ("succeeded", False)]


async def test_a_message_carrying_a_record_too_deep_to_read_is_run_as_if_it_carried_none(make_settings, rabbit):
    settings = make_settings()
    async with consuming(settings) as runtime:
        headers = {RECORD_HEADER: True, QUEUED_RECORD_HEADER: DEEP_RECORD, QUEUED_VERSION_HEADER: "v"}
        image_id = await publish(settings.amqp_url, IMAGE_INDEX, index_message(4), headers=headers)
        await wait_until(lambda: _count_is(runtime, 1))
        assert set(await runtime.index.get_many([image_id])) == {image_id}
        assert rabbit.queue_counts(vhost_of(settings)).get("ams.dead", (0, 0))[0] == 0


def _start_processor(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "processor"],
        env={**os.environ, **env},
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parent.parent,
    )


async def test_killed_processor_loses_nothing_and_duplicates_nothing(make_env, rabbit, tmp_path):
    """Freeze the S3 server so the processor holds the message unacked, kill -9 the processor, thaw S3,
    start a new processor: the message is processed exactly once (one object, one point)."""
    s3 = S3Process(free_port())
    try:
        s3.create_bucket("crash")
        metrics_port = free_port()
        env = make_env(
            r2_bucket="crash",
            endpoint=s3.endpoint,
            LOG_FORMAT="json",
            LOG_LEVEL="info",
            PROCESSOR_METRICS_PORT=str(metrics_port),
        )
        vhost = env["VHOST"]
        log_path = tmp_path / "processor.log"
        first = _start_processor(env, log_path)
        await wait_until(lambda: "consumer_started" in log_path.read_text(), timeout=90)

        s3.freeze()
        image_id = str(uuid.uuid4())
        await publish(env["AMQP_URL"], IMAGE_INDEX, index_message(99, image_id))
        await wait_until(lambda: rabbit.queue_counts(vhost)["ams.index"] == (0, 1), timeout=30)
        first.kill()
        first.wait()
        await wait_until(lambda: rabbit.queue_counts(vhost)["ams.index"] == (1, 0), timeout=30)
        s3.thaw()

        second = _start_processor(env, log_path)
        try:
            await wait_until(lambda: rabbit.queue_counts(vhost)["ams.index"] == (0, 0), timeout=90)
            await wait_until(lambda: "job_succeeded" in log_path.read_text(), timeout=30)
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            assert 'ams_jobs_total{outcome="succeeded",type="image.index"} 1.0' in metrics
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0
        objects = [key for key in s3.keys("crash") if key.startswith("images/")]
        assert objects == [f"images/originals/{image_id}.png", thumbnail_key(image_id)]
        index = await EdgeIndex.open(Path(env["IMAGE_SEARCH_DB_PATH"]), "images")
        try:
            assert await index.count() == 1
            assert (await index.get(image_id)).r2_key == objects[0]
        finally:
            await index.close()
        assert rabbit.queue_counts(vhost).get("ams.dead", (0, 0)) == (0, 0)
    finally:
        s3.stop()


async def test_sigterm_lets_the_job_in_hand_finish_and_exits_0(make_env, rabbit, tmp_path):
    """SIGTERM while a generation runs: the processor stops taking messages, finishes that job (recorded, acked),
    leaves the next one queued for whoever comes next, and exits 0. Every line it wrote is one JSON object, the
    text encoder's warning about the over-long prompt included (diffusers logs it through a handler of its own
    unless it is routed into ours), with the prompt cut short."""
    env = make_env(
        IMAGE_ENABLED="1", IMAGE_SEARCH_ENABLED="0", PROCESSOR_CAPABILITIES="image", LOG_FORMAT="json", LOG_LEVEL="info"
    )
    log_path = tmp_path / "processor.log"
    process = _start_processor(env, log_path)
    try:
        await wait_until(lambda: "consumer_started" in log_path.read_text(), timeout=90)
        prompt = "a lighthouse over a harbour at dusk, " * 50
        body = {"prompt": prompt, "width": 160, "height": 160, "steps": 4, "seed": 1}  # 1-3 s here
        in_hand = await publish(env["AMQP_URL"], "image.generate", body)
        queued = await publish(env["AMQP_URL"], "image.generate", body)
        # the text encoder warns about the over-long prompt as the generation starts
        await wait_until(lambda: "truncated" in log_path.read_text(), timeout=30)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    store = await open_store(Settings.from_env(env))
    try:
        jobs = JobStore(store, 7)
        assert (await jobs.get(in_hand)).status == "succeeded"
        assert await store.exists(f"images/generated/{in_hand}.png")
        assert not await store.exists(f"images/generated/{queued}.png")
    finally:
        await store.close()
    assert rabbit.queue_counts(env["VHOST"])["ams.image"] == (1, 0), "the next job waits for the next processor"
    assert rabbit.queue_counts(env["VHOST"])["ams.dead"] == (0, 0)
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    events = [str(record.get("event", "")) for record in records]
    assert "shutdown_requested" in events
    assert any("truncated" in event for event in events), "the over-long prompt's warning, as JSON"
    assert all(len(event) < 1100 for event in events), "user text is cut short in logs"
