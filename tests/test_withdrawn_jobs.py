"""Jobs whose publish went unconfirmed: the API answers 503 and withdraws the job (its record says so), and a
processor that gets the message makes nothing of it, however recent its stamp (the withdrawal and the processor's
running mark are conditional writes on one version, and a job waits for its mark before it stores anything); a
processor that took the job first wins, and the client is told the job was accepted. (A real broker alarm, end to
end: tests/test_broker_outage.py.)"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from contract.jobs import WITHDRAWN, JobStore, record_headers, withdrawn
from contract.messages import IMAGE_GENERATE, IMAGE_INDEX
from infra.broker import BrokerUnavailableError
from infra.settings import Settings
from processor.ops.headers import REPLAYED_AT_HEADER
from tests.support.amqp import publish, wait_until
from tests.support.images import encoded
from tests.support.server import running_server


@pytest.fixture(scope="module")
def env(make_env):
    return make_env(IMAGE_ENABLED="1")


@pytest.fixture(scope="module")
async def server(env):
    async with running_server(Settings.from_env(env)) as running:
        yield running


@pytest.fixture
def model_runs(server, monkeypatch) -> list[str]:
    """What the models were asked to do: "generate" for each image generated, "embed" for each batch embedded."""
    runs: list[str] = []
    runtime = server.processor.runtime
    generate, embed = runtime.generator.generate, runtime.clip.embed_prepared

    def generated(*args, **kwargs):
        runs.append("generate")
        return generate(*args, **kwargs)

    def embedded(*args, **kwargs):
        runs.append("embed")
        return embed(*args, **kwargs)

    monkeypatch.setattr(runtime.generator, "generate", generated)
    monkeypatch.setattr(runtime.clip, "embed_prepared", embedded)
    return runs


def _jobs(server) -> JobStore:
    return JobStore(server.services.store, 7)


def _stamped(job_type: str, params: dict, seconds_ago: float):
    """A queued record as the API writes it just before publishing, `seconds_ago` (the publish's stamp)."""
    record = JobStore.new(str(uuid.uuid4()), job_type, params)
    stamp = (datetime.now(tz=UTC) - timedelta(seconds=seconds_ago)).isoformat().replace("+00:00", "Z")
    return msgspec.structs.replace(record, created_at=stamp, updated_at=stamp)


def _body(job_type: str, job_id: str) -> dict:
    if job_type == IMAGE_GENERATE:
        return {"prompt": "late", "seed": 3, "width": 64, "height": 64}
    return {"image_id": job_id, "data": base64.b64encode(encoded(5)).decode(), "source": "upload"}


async def _publish_as_the_api_did(server, queued, version: str) -> None:
    """The job's message as the API published it, with the record it wrote (at `version`) in its headers."""
    await publish(
        server.services.settings.amqp_url,
        queued.type,
        _body(queued.type, queued.job_id),
        message_id=queued.job_id,
        headers=record_headers(queued, version),
    )


async def _unconfirmed(**kwargs):
    """A publish whose confirm did not come: the message may still reach its queue."""
    raise BrokerUnavailableError("RabbitMQ did not confirm it within 10 s")


def _drained(rabbit, env) -> bool:
    counts = rabbit.queue_counts(env["VHOST"])
    return counts["ams.image"] == (0, 0) and counts["ams.index"] == (0, 0)


@pytest.mark.parametrize("seconds_ago", [30, 0], ids=["late", "fresh"])
@pytest.mark.parametrize("job_type", [IMAGE_GENERATE, IMAGE_INDEX])
async def test_the_message_of_a_withdrawn_job_is_acknowledged_and_makes_nothing(
    server, env, rabbit, model_runs, job_type, seconds_ago
):
    """The message the API's 503 was about arrives after the API withdrew the job: its running mark finds the
    record withdrawn, so it stores nothing and is acknowledged: no output, no point, no dead letter, the record left
    as the API wrote it. A fresh stamp (a message that arrives at once, or an API whose clock runs behind) makes
    no difference to that; a late one (it waited in the queue) is not even run: its mark is written first."""
    jobs = _jobs(server)
    queued = _stamped(job_type, {"prompt": "late"}, seconds_ago=seconds_ago)
    version = await jobs.create(queued)
    gone = withdrawn(queued, "RabbitMQ did not confirm it within 10 s")
    await jobs.update(gone, version)
    points = await server.services.index.count()
    dead_before = rabbit.queue_counts(env["VHOST"])["ams.dead"]
    await _publish_as_the_api_did(server, queued, version)
    await wait_until(lambda: _drained(rabbit, env), timeout=30)
    assert await jobs.get(queued.job_id) == gone
    assert not await server.services.store.exists(f"images/generated/{queued.job_id}.png")
    assert not [info async for info in server.services.store.list(f"images/originals/{queued.job_id}")]
    assert await server.services.index.count() == points
    assert rabbit.queue_counts(env["VHOST"])["ams.dead"] == dead_before
    if seconds_ago:
        assert model_runs == []


async def test_a_late_message_of_a_job_still_queued_is_run(server, env, rabbit):
    jobs = _jobs(server)
    queued = _stamped(IMAGE_GENERATE, {"prompt": "late"}, seconds_ago=30)
    version = await jobs.create(queued)
    await _publish_as_the_api_did(server, queued, version)

    async def finished() -> bool:
        found = await jobs.get(queued.job_id)
        return found is not None and found.status == "succeeded"

    await wait_until(finished, timeout=30)
    assert (await jobs.get(queued.job_id)).attempts == 1
    assert await server.services.store.exists(f"images/generated/{queued.job_id}.png")


async def test_a_job_a_processor_took_before_the_withdrawal_is_answered_as_accepted(server, monkeypatch):
    """The confirm is lost after the message was queued (the connection dropped, say) and the processor took the
    job before the API could withdraw it: the job was accepted after all, so the client gets 202 with the job,
    which finishes once, instead of a 503 for a job that runs."""
    publisher = server.services.publisher
    real = publisher.publish
    jobs = _jobs(server)

    async def taken_then_lost(**kwargs):
        await real(**kwargs)

        async def taken() -> bool:
            found = await jobs.get(kwargs["message_id"])
            return found is not None and found.status != "queued"

        await wait_until(taken, timeout=30, interval=0.01)
        raise BrokerUnavailableError("the connection was lost before the confirm came")

    with monkeypatch.context() as patched:
        patched.setattr(publisher, "publish", taken_then_lost)
        response = await server.client.post("/v1/images/generate", json={"prompt": "taken", "seed": 6})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]

    async def done() -> bool:
        return (await server.client.get(f"/v1/jobs/{job_id}")).json()["status"] == "succeeded"

    await wait_until(done, timeout=30)
    assert (await server.client.get(f"/v1/jobs/{job_id}")).json()["attempts"] == 1


async def test_a_publish_that_never_left_leaves_no_record(server, monkeypatch):
    async def not_connected(**kwargs):
        raise BrokerUnavailableError("not connected to RabbitMQ", unsent=True)

    before = [info.key async for info in server.services.store.list("jobs/")]
    monkeypatch.setattr(server.services.publisher, "publish", not_connected)
    response = await server.client.post("/v1/jobs", json={"type": IMAGE_GENERATE, "params": {"prompt": "x"}})
    assert response.status_code == 503
    assert response.json()["code"] == "broker_unavailable"
    assert [info.key async for info in server.services.store.list("jobs/")] == before


async def test_a_withdrawn_job_reads_as_failed_and_its_idempotency_key_starts_it_again(server, monkeypatch):
    key = {"Idempotency-Key": "withdrawn-then-again"}
    body = {"type": IMAGE_GENERATE, "params": {"prompt": "again", "seed": 9}}
    with monkeypatch.context() as patched:
        patched.setattr(server.services.publisher, "publish", _unconfirmed)
        refused = await server.client.post("/v1/jobs", json=body, headers=key)
    assert refused.status_code == 503
    retried = await server.client.post("/v1/jobs", json=body, headers=key)
    assert retried.status_code == 202, retried.text
    job_id = retried.json()["job_id"]

    async def done() -> bool:
        return (await server.client.get(f"/v1/jobs/{job_id}")).json()["status"] == "succeeded"

    await wait_until(done, timeout=30)
    again = await server.client.post("/v1/jobs", json=body, headers=key)
    assert (again.status_code, again.json()["job_id"]) == (202, job_id)


async def test_the_withdrawn_record_says_why(server, monkeypatch):
    before = {info.key async for info in server.services.store.list("jobs/")}
    with monkeypatch.context() as patched:
        patched.setattr(server.services.publisher, "publish", _unconfirmed)
        refused = await server.client.post("/v1/jobs", json={"type": IMAGE_GENERATE, "params": {"prompt": "why"}})
    assert refused.status_code == 503
    (key,) = {info.key async for info in server.services.store.list("jobs/")} - before
    job = (await server.client.get(f"/v1/jobs/{key.removeprefix('jobs/').removesuffix('.json')}")).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == WITHDRAWN
    assert "does not run" in job["error"]["message"]
    assert "did not confirm" in job["error"]["message"]


async def test_a_message_rabbitmq_refuses_leaves_nothing(server, env, rabbit):
    """A queue at its length limit with overflow reject-publish (an operator's policy) nacks the publish: RabbitMQ
    said it did not take the message, so the record is removed again (nothing left) and the 503 says why."""
    vhost = env["VHOST"]
    policy = json.dumps({"max-length": 0, "overflow": "reject-publish"})
    full = ("set_policy", "-p", vhost, "--apply-to", "queues", "--priority", "10", "full", "^ams\\.image$", policy)
    await asyncio.to_thread(rabbit.ctl, *full)
    try:
        before = {info.key async for info in server.services.store.list("jobs/")}
        accepted: set[str] = set()  # before the policy took effect

        async def refused() -> bool:
            response = await server.client.post("/v1/jobs", json={"type": IMAGE_GENERATE, "params": {"prompt": "x"}})
            if response.status_code == 202:
                accepted.add(f"jobs/{response.json()['job_id']}.json")
                return False
            assert response.status_code == 503, response.text
            assert "refused it" in response.json()["message"]
            return True

        await wait_until(refused, timeout=30, interval=0.2)
        assert {info.key async for info in server.services.store.list("jobs/")} - accepted == before
    finally:
        await asyncio.to_thread(rabbit.ctl, "clear_policy", "-p", vhost, "full")


async def test_an_operators_replay_does_not_run_a_withdrawn_job(server, env, rabbit):
    """A replay reopens a failed job, but not a withdrawn one: its client was told it does not run."""
    jobs = _jobs(server)
    queued = _stamped(IMAGE_GENERATE, {"prompt": "late"}, seconds_ago=30)
    version = await jobs.create(queued)
    gone = withdrawn(queued, "RabbitMQ did not confirm it within 10 s")
    await jobs.update(gone, version)
    dead_before = rabbit.queue_counts(env["VHOST"])["ams.dead"]
    await publish(
        server.services.settings.amqp_url,
        IMAGE_GENERATE,
        _body(IMAGE_GENERATE, queued.job_id),
        message_id=queued.job_id,
        headers={**record_headers(queued, version), REPLAYED_AT_HEADER: "2026-11-28T00:00:00Z"},
    )
    await wait_until(lambda: _drained(rabbit, env), timeout=30)
    assert await jobs.get(queued.job_id) == gone
    assert not await server.services.store.exists(f"images/generated/{queued.job_id}.png")
    assert rabbit.queue_counts(env["VHOST"])["ams.dead"] == dead_before
