"""Transient failures: a storage outage (an S3 server down, a full disk under the embedded store) makes jobs retry
through the delay queues and succeed once it is over, or, past MAX_ATTEMPTS, dead-letter; an operator replays them
after the fault is fixed, and each is processed exactly once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable

import httpx
from click.testing import CliRunner

from contract.image_ids import thumbnail_key
from contract.jobs import JOBS_PREFIX
from contract.messages import IMAGE_GENERATE, IMAGE_INDEX
from contract.metrics import REGISTRY
from infra.settings import Settings
from processor.ops.__main__ import cli
from processor.runtime import Runtime
from processor.service import build_consumer
from tests.support.amqp import publish, wait_until
from tests.support.disk import fill, small_disk
from tests.support.images import encoded
from tests.support.rabbitmq import free_port
from tests.support.s3 import S3Process
from tests.support.server import running_server

BUCKET = "outage"


def retried() -> float:
    return REGISTRY.get_sample_value("ams_jobs_total", {"type": IMAGE_INDEX, "outcome": "retried"}) or 0.0


@contextlib.asynccontextmanager
async def processor_with_s3(make_env, **overrides: str) -> AsyncIterator[tuple[dict, Runtime, list[S3Process]]]:
    """A processor whose S3 server (a subprocess) the test can take down and bring back on the same port."""
    port = free_port()
    servers = [S3Process(port)]
    servers[0].create_bucket(BUCKET)
    env = make_env(r2_bucket=BUCKET, endpoint=servers[0].endpoint, **overrides)
    runtime = await Runtime.open(Settings.from_env(env))
    consumer = build_consumer(runtime)
    await consumer.start()
    try:
        yield env, runtime, servers
    finally:
        await consumer.stop()
        await runtime.close()
        for server in servers:
            server.stop()


HUNG_TIMEOUT_SECONDS = 1.0  # R2_TIMEOUT_SECONDS in the hung-store tests


async def answered_within(seconds: float, request: Awaitable[httpx.Response]) -> httpx.Response:
    """The response, which must come within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            return await request
    except TimeoutError:
        raise AssertionError(f"no answer within {seconds} s") from None


def bring_back(servers: list[S3Process]) -> S3Process:
    port = int(servers[0].endpoint.rsplit(":", 1)[1])
    server = S3Process(port)
    server.create_bucket(BUCKET)
    servers.append(server)
    return server


def index_body(seed: int, image_id: str) -> dict:
    return {"image_id": image_id, "data": base64.b64encode(encoded(seed)).decode(), "source": "outage-test"}


async def test_jobs_retry_through_an_outage_and_then_succeed(make_env, rabbit):
    async with processor_with_s3(make_env, MAX_ATTEMPTS="5") as (env, runtime, servers):
        servers[0].stop()
        image_id = str(uuid.uuid4())
        before = retried()
        await publish(env["AMQP_URL"], IMAGE_INDEX, index_body(1, image_id), message_id=image_id)
        await wait_until(lambda: retried() > before, timeout=60)
        s3 = bring_back(servers)

        async def indexed() -> bool:
            return await runtime.index.get(image_id) is not None

        await wait_until(indexed, timeout=60)
        assert s3.keys(BUCKET) == [f"images/originals/{image_id}.png", thumbnail_key(image_id)]
        assert rabbit.queue_counts(env["VHOST"])["ams.dead"] == (0, 0)


async def test_past_max_attempts_jobs_dead_letter_and_replay_processes_each_once(make_env, rabbit):
    async with processor_with_s3(make_env, MAX_ATTEMPTS="2") as (env, runtime, servers):
        servers[0].stop()
        image_id = str(uuid.uuid4())
        await publish(env["AMQP_URL"], IMAGE_INDEX, index_body(10, image_id), message_id=image_id)
        poison = await publish(env["AMQP_URL"], IMAGE_INDEX, {"source": "no image at all"})
        await wait_until(lambda: rabbit.queue_counts(env["VHOST"])["ams.dead"] == (2, 0), timeout=90)

        listed = await asyncio.to_thread(CliRunner().invoke, cli, ["dlq", "list", "--json"], env=env)
        assert listed.exit_code == 0, listed.output
        reasons = {letter["message_id"]: letter for letter in json.loads(listed.output)}
        assert reasons[image_id]["reason_code"] == "storage_unavailable"
        assert reasons[image_id]["attempts"] == 2
        assert reasons[poison]["reason_code"] == "schema_violation"
        assert reasons[poison]["attempts"] == 1

        s3 = bring_back(servers)
        replay = await asyncio.to_thread(
            CliRunner().invoke, cli, ["dlq", "replay", "--reason", "storage_unavailable"], env=env
        )
        assert replay.exit_code == 0, replay.output
        assert "replayed 1" in replay.output

        async def indexed() -> bool:
            return await runtime.index.get(image_id) is not None

        await wait_until(indexed, timeout=60)
        await wait_until(lambda: rabbit.queue_counts(env["VHOST"])["ams.index"] == (0, 0), timeout=30)
        assert s3.keys(BUCKET) == [f"images/originals/{image_id}.png", thumbnail_key(image_id)]
        assert await runtime.index.count() == 1
        assert rabbit.queue_counts(env["VHOST"])["ams.dead"] == (1, 0)  # the poison message stays


def generation(prompt: str) -> dict:
    return {"prompt": prompt, "width": 64, "height": 64, "steps": 1}


async def test_a_job_meeting_a_hung_store_is_retried_and_succeeds_once_it_answers(make_env, rabbit):
    """The S3 server stops answering while a job runs: each store call gives up after R2_TIMEOUT_SECONDS, the job
    is retried through the delay queues, and once the server answers again it succeeds, once: one original, one
    thumbnail, one point, though the server makes the writes it took while frozen when it thaws."""
    async with processor_with_s3(make_env, MAX_ATTEMPTS="10", R2_TIMEOUT_SECONDS=str(HUNG_TIMEOUT_SECONDS)) as (
        env,
        runtime,
        servers,
    ):
        image_id = str(uuid.uuid4())
        before = retried()
        with servers[0].frozen():
            await publish(env["AMQP_URL"], IMAGE_INDEX, index_body(2, image_id), message_id=image_id)
            await wait_until(lambda: retried() > before, timeout=15)

        async def indexed() -> bool:
            return await runtime.index.get(image_id) is not None

        await wait_until(indexed, timeout=60)
        assert servers[0].keys(BUCKET) == [f"images/originals/{image_id}.png", thumbnail_key(image_id)]
        assert await runtime.index.count() == 1
        assert rabbit.queue_counts(env["VHOST"])["ams.dead"] == (0, 0)


async def test_a_hung_store_is_a_503_within_its_timeout_and_the_server_recovers_when_it_answers(make_env, rabbit):
    """An S3 server that takes connections and never answers: a sync generation, a job's status and /readyz each
    answer 503 within a few seconds (R2_TIMEOUT_SECONDS per store call), however many requests wait at once (more
    than the client's pool of connections, R2_MAX_CONNECTIONS); nothing is published. Thawed, the same requests go
    through."""
    s3 = S3Process(free_port())
    try:
        s3.create_bucket(BUCKET)
        env = make_env(
            r2_bucket=BUCKET,
            endpoint=s3.endpoint,
            IMAGE_ENABLED="1",
            R2_TIMEOUT_SECONDS=str(HUNG_TIMEOUT_SECONDS),
            R2_MAX_CONNECTIONS="10",
        )
        async with running_server(Settings.from_env(env)) as server:
            assert (await server.client.get("/readyz")).status_code == 200
            bound = 3 * HUNG_TIMEOUT_SECONDS + 1  # a request fails at its first store call that gets no answer
            with s3.frozen():
                refused = await answered_within(
                    bound, server.client.post("/v1/images/generate", json=generation("hung"))
                )
                assert refused.status_code == 503, refused.text
                assert refused.json()["code"] == "storage_unavailable"
                assert int(refused.headers["retry-after"]) > 0

                statuses = await asyncio.gather(
                    *(answered_within(bound, server.client.get(f"/v1/jobs/{uuid.uuid4()}")) for _ in range(60))
                )
                assert {response.status_code for response in statuses} == {503}

                ready = await answered_within(bound, server.client.get("/readyz"))
                assert ready.status_code == 503
                assert ready.json()["failing"] == ["storage"]
                assert rabbit.queue_counts(env["VHOST"])["ams.image"] == (0, 0)  # nothing published

            async def ready() -> bool:
                return (await server.client.get("/readyz")).status_code == 200

            await wait_until(ready, timeout=10)

            def records() -> list[str]:
                return [key for key in s3.keys(BUCKET) if key.startswith(JOBS_PREFIX)]

            # the refused generation's queued record, which the frozen store took and wrote once thawed (the client
            # had its 503, no message left): the API withdraws it once the store answers, and nothing is left
            await wait_until(lambda: not records(), timeout=30, interval=0.5)
            again = await server.client.post("/v1/images/generate", json=generation("hung"))
            assert again.status_code == 200, again.text
            assert rabbit.queue_counts(env["VHOST"])["ams.dead"] == (0, 0)
    finally:
        s3.stop()


async def test_a_full_disk_under_the_embedded_store_is_a_503_and_jobs_wait_it_out(make_env, rabbit, tmp_path):
    """R2 off: the disk under LOCAL_STORAGE_DIR fills up. The API answers 503 with Retry-After and publishes
    nothing; a job already on the queue retries through the delay queues; once space is freed, both go through."""
    with small_disk(tmp_path / "disk") as disk:
        env = make_env(LOCAL_STORAGE_DIR=str(disk / "storage"), IMAGE_ENABLED="1", MAX_ATTEMPTS="10")
        async with running_server(Settings.from_env(env)) as server:
            filler = fill(disk)
            refused = await server.client.post("/v1/jobs", json={"type": IMAGE_GENERATE, "params": generation("a")})
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "storage_unavailable"
            assert int(refused.headers["retry-after"]) > 0
            assert rabbit.queue_counts(env["VHOST"])["ams.image"] == (0, 0)  # nothing published

            before = REGISTRY.get_sample_value("ams_jobs_total", {"type": IMAGE_GENERATE, "outcome": "retried"}) or 0
            upstream = await publish(env["AMQP_URL"], IMAGE_GENERATE, generation("b"))

            def retried() -> bool:
                labels = {"type": IMAGE_GENERATE, "outcome": "retried"}
                return (REGISTRY.get_sample_value("ams_jobs_total", labels) or 0) > before

            await wait_until(retried, timeout=60)
            filler.unlink()

            async def succeeded() -> bool:
                response = await server.client.get(f"/v1/jobs/{upstream}")
                return response.status_code == 200 and response.json()["status"] == "succeeded"

            await wait_until(succeeded, timeout=60)
            again = await server.client.post("/v1/images/generate", json=generation("a"))
            assert again.status_code == 200, again.text
            assert rabbit.queue_counts(env["VHOST"])["ams.dead"] == (0, 0)
