"""A job whose message never left (the API stopped between writing its queued record and publishing) runs when its
client retries the request with the same Idempotency-Key: the API sends the message again once the record is past
any publish of the request that wrote it (api/resend.py). A job a processor took meanwhile is not sent again."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from api.resend import Resend, Resender
from contract.jobs import JobStore, job_id_for_idempotency_key, withdrawn
from contract.messages import IMAGE_GENERATE, ImageGenerateV1
from infra.broker import BrokerUnavailableError, Priority
from infra.settings import Settings
from tests.support.amqp import wait_until
from tests.support.server import running_server

DUE_SECONDS = 1.0
BODY = {"prompt": "a job whose message never left", "seed": 11, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def env(make_env):
    return make_env(IMAGE_ENABLED="1")


@pytest.fixture(scope="module")
async def server(env):
    async with running_server(Settings.from_env(env)) as running:
        yield running


@pytest.fixture(autouse=True)
def due_soon(monkeypatch) -> None:
    """Records are due RESEND_AFTER_SECONDS (15 s) after their stamp; here after DUE_SECONDS."""
    monkeypatch.setattr("api.resend.RESEND_AFTER_SECONDS", DUE_SECONDS)


@pytest.fixture
def sends(server, monkeypatch) -> list[str]:
    """The job ids the API sent again, in order."""
    sent: list[str] = []
    real = Resender._send

    async def send(self, record, version, resend):
        sent.append(record.job_id)
        return await real(self, record, version, resend)

    monkeypatch.setattr(Resender, "_send", send)
    return sent


def _jobs(server) -> JobStore:
    return JobStore(server.services.store, 7)


async def _orphan(server, monkeypatch, key: str) -> str:
    """Start a generation with `key` through the real API, which stops right after writing the queued record (its
    publish raises, as if the process died there): the record stays queued and no message exists."""

    async def died(**kwargs):
        raise RuntimeError("the API process stopped here")

    with monkeypatch.context() as patched:
        patched.setattr(server.services.publisher, "publish", died)
        response = await server.client.post("/v1/images/generate", json=BODY, headers={"Idempotency-Key": key})
    assert response.status_code == 500
    job_id = job_id_for_idempotency_key(IMAGE_GENERATE, key)
    record = await _jobs(server).get(job_id)
    assert record is not None and record.status == "queued" and record.attempts == 0
    return job_id


async def _post(server, key: str):
    return await server.client.post("/v1/images/generate", json=BODY, headers={"Idempotency-Key": key})


async def _status(server, job_id: str) -> str | None:
    record = await _jobs(server).get(job_id)
    return None if record is None else record.status


async def test_a_retry_sends_the_message_of_a_job_that_never_left(server, monkeypatch, sends):
    key = f"orphan-{uuid.uuid4()}"
    job_id = await _orphan(server, monkeypatch, key)
    await asyncio.sleep(DUE_SECONDS + 0.5)
    assert await _status(server, job_id) == "queued"  # nothing runs it by itself

    retry = await server.client.post("/v1/images/generate", json=BODY, headers={"Idempotency-Key": key})
    assert retry.status_code == 200  # it waited for the job, which the message sent again ran
    assert retry.headers["x-job-id"] == job_id and retry.content.startswith(b"\x89PNG")
    assert sends == [job_id]
    again = await server.client.post("/v1/images/generate", json=BODY, headers={"Idempotency-Key": key})
    assert again.status_code == 200
    assert again.headers["content-type"] == "image/png" and again.content.startswith(b"\x89PNG")
    assert sends == [job_id]  # a finished job is not watched


async def test_a_young_record_is_sent_again_only_once_it_is_due(server, monkeypatch, sends):
    key = f"orphan-{uuid.uuid4()}"
    job_id = await _orphan(server, monkeypatch, key)
    retry = asyncio.create_task(_post(server, key))
    await asyncio.sleep(DUE_SECONDS / 3)
    assert sends == []
    second = asyncio.create_task(_post(server, key))
    assert [response.status_code for response in await asyncio.gather(retry, second)] == [200, 200]
    assert sends == [job_id]  # two retries, one message


async def test_a_job_taken_before_it_is_due_is_not_sent_again(server, monkeypatch, sends):
    """The record is queued when the retry comes (its message was merely waiting), and a processor takes the job
    before the record is due: the conditional stamp fails, nothing is sent."""
    key = f"waiting-{uuid.uuid4()}"
    job_id = await _orphan(server, monkeypatch, key)
    monkeypatch.setattr("api.resend.RESEND_AFTER_SECONDS", 30.0)
    retry = asyncio.create_task(_post(server, key))
    await asyncio.sleep(0.2)
    record, version = await _jobs(server).load(job_id)
    payload = ImageGenerateV1(**BODY)
    await server.services.resender._send(record, version, Resend(IMAGE_GENERATE, payload, Priority.ASYNC))

    async def succeeded() -> bool:
        return await _status(server, job_id) == "succeeded"

    await wait_until(succeeded, timeout=30)
    assert (await retry).status_code == 200
    watched = Resender(_jobs(server), server.services.publisher)
    monkeypatch.setattr("api.resend.RESEND_AFTER_SECONDS", 0.0)
    watched.watch(record, version, Resend(IMAGE_GENERATE, payload, Priority.ASYNC))
    await asyncio.sleep(0.3)
    await watched.close()
    assert sends == [job_id]  # only the test's own send: the watch found the record moved on


async def test_a_send_that_reached_no_queue_puts_the_stamp_back(server, monkeypatch, sends):
    key = f"orphan-{uuid.uuid4()}"
    job_id = await _orphan(server, monkeypatch, key)
    found = await _jobs(server).get(job_id)

    async def refused(**kwargs):
        raise BrokerUnavailableError("not connected to RabbitMQ", unsent=True)

    with monkeypatch.context() as patched:
        patched.setattr(server.services.publisher, "publish", refused)
        retry = asyncio.create_task(_post(server, key))
        await wait_until(lambda: sends == [job_id], timeout=10)
        await asyncio.sleep(0.2)
    assert await _jobs(server).get(job_id) == found  # queued, with the stamp it had: due at once

    later = await _post(server, key)  # watched again, sent
    assert later.status_code == 200
    assert (await retry).status_code == 200  # the first retry kept waiting, and has the same job's image
    assert (await retry).content == later.content
    assert sends == [job_id, job_id]


@pytest.mark.parametrize("fate", ["withdrawn", "removed"])
async def test_a_retry_waiting_for_a_job_that_was_not_accepted_gets_the_503_the_first_request_got(
    server, monkeypatch, fate
):
    """While a retry waits, the first request's publish fails: its job is withdrawn (the message may still arrive)
    or its record removed (it certainly did not leave). The retry answers 503 as the first request does, and the
    key then starts the job afresh."""
    key = f"not-accepted-{uuid.uuid4()}"
    job_id = await _orphan(server, monkeypatch, key)
    monkeypatch.setattr("api.resend.RESEND_AFTER_SECONDS", 30.0)
    retry = asyncio.create_task(_post(server, key))
    await asyncio.sleep(0.2)
    record, version = await _jobs(server).load(job_id)
    if fate == "withdrawn":
        await _jobs(server).update(withdrawn(record, "RabbitMQ did not confirm the publish"), version)
    else:
        await _jobs(server).delete(job_id)
    refused = await retry
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "broker_unavailable" and refused.headers["retry-after"]
    assert job_id in refused.json()["message"]
    started = await _post(server, key)
    assert started.status_code == 200 and started.headers["x-job-id"] == job_id


async def test_of_two_api_processes_one_sends(server, monkeypatch, sends):
    """Two API processes watching the same record: the conditional stamp lets one of them send."""
    key = f"orphan-{uuid.uuid4()}"
    job_id = await _orphan(server, monkeypatch, key)
    record, version = await _jobs(server).load(job_id)
    resend = Resend(IMAGE_GENERATE, ImageGenerateV1(**BODY), Priority.ASYNC)
    first, second = (Resender(_jobs(server), server.services.publisher) for _ in range(2))
    first.watch(record, version, resend)
    second.watch(record, version, resend)

    async def succeeded() -> bool:
        return await _status(server, job_id) == "succeeded"

    await wait_until(succeeded, timeout=30)
    await asyncio.gather(first.close(), second.close())
    assert sends == [job_id]
