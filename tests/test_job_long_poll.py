"""Long polls of a job (GET /v1/jobs/{id}?wait_seconds=N): the answer comes when the job's status changes, or after
N seconds; a client that gives up stops the reads. The API runs alone (python -m api), so jobs stay queued until a
test starts a processor on the same broker and store. (A long poll open when the server is asked to stop answers at
once: tests/test_server_process.py.)"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from contract.jobs import job_id_for_idempotency_key, record_key
from contract.messages import IMAGE_GENERATE
from infra.settings import Settings
from tests.support.server import running_server
from tests.test_processor import consuming

PARAMS = {"prompt": "a job somebody waits for", "width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def settings(make_env) -> Settings:
    env = make_env(IMAGE_ENABLED="1", IMAGE_SEARCH_ENABLED="0", PROCESSOR_CAPABILITIES="image")
    return Settings.from_env(env)


@pytest.fixture(scope="module")
async def server(settings):
    async with running_server(settings, with_processor=False) as running:
        yield running


async def _queued_job(server, seed: int) -> str:
    response = await server.client.post("/v1/jobs", json={"type": IMAGE_GENERATE, "params": {**PARAMS, "seed": seed}})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


async def _long_poll(server, job_id: str, seconds: float, **params: str) -> tuple[float, dict]:
    started = time.monotonic()
    response = await server.client.get(f"/v1/jobs/{job_id}", params={"wait_seconds": seconds, **params})
    assert response.status_code == 200, response.text
    return time.monotonic() - started, response.json()


async def test_a_long_poll_of_a_job_nobody_runs_answers_after_its_wait(server):
    job_id = await _queued_job(server, 1)
    took, job = await _long_poll(server, job_id, 0.8)
    assert job["status"] == "queued"
    assert 0.8 <= took < 3


async def test_long_polls_follow_a_job_to_its_end_one_change_at_a_time(server, settings):
    job_id = await _queued_job(server, 2)
    poll = asyncio.create_task(_long_poll(server, job_id, 25))
    await asyncio.sleep(0.5)
    assert not poll.done()  # nothing has changed yet
    async with consuming(settings):
        took, job = await poll
        assert job["status"] in ("running", "succeeded")
        assert took < 20
        seen = [job["status"]]
        while job["status"] != "succeeded":
            _, job = await _long_poll(server, job_id, 25)
            assert job["status"] != seen[-1], seen  # each answer is a change
            seen.append(job["status"])
    assert job["result"]["url"]
    took, again = await _long_poll(server, job_id, 25)  # a finished job is answered at once
    assert took < 1 and again["status"] == "succeeded"


async def test_a_long_poll_waits_while_the_status_the_client_last_saw_lasts(server):
    """A client that saw `queued` and asks again after the job moved on is answered at once; one whose status is
    still current waits for the next change."""
    job_id = await _queued_job(server, 6)
    took, job = await _long_poll(server, job_id, 25, while_status="running")
    assert took < 1 and job["status"] == "queued"  # the job is not in the status the client saw: answered at once
    poll = asyncio.create_task(_long_poll(server, job_id, 25, while_status="queued"))
    await asyncio.sleep(0.3)
    assert not poll.done()
    assert (await server.client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    _, job = await poll
    assert job["status"] == "failed"


async def test_a_cancellation_ends_a_long_poll_at_once(server):
    job_id = await _queued_job(server, 3)
    poll = asyncio.create_task(_long_poll(server, job_id, 25))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    assert (await server.client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    _, job = await poll
    assert (job["status"], job["error"]["code"]) == ("failed", "cancelled")
    assert time.monotonic() - started < 2


def _count_record_reads(server, monkeypatch, job_id: str) -> list[float]:
    """When each read of the job's record starts, from now on."""
    store, reads = server.services.store, []
    read = store.get

    async def counted(key: str, *args, **kwargs):
        if key == record_key(job_id):
            reads.append(time.monotonic())
        return await read(key, *args, **kwargs)

    monkeypatch.setattr(store, "get", counted)
    return reads


async def test_a_client_that_gives_up_stops_the_reads(server, monkeypatch):
    job_id = await _queued_job(server, 4)
    reads = _count_record_reads(server, monkeypatch, job_id)
    with pytest.raises(httpx.ReadTimeout):
        await server.client.get(f"/v1/jobs/{job_id}", params={"wait_seconds": 20}, timeout=1.5)
    gave_up = time.monotonic()
    await asyncio.sleep(2.5)  # the record is read every 0.5 s while somebody waits
    assert len(reads) >= 3, "the long poll did not read the record while the client waited"
    assert not [at for at in reads if at > gave_up + 0.7], "the record was still read after the client left"


async def test_a_sync_request_whose_client_gives_up_stops_waiting_and_the_job_stays(server, monkeypatch):
    """A generation's client that leaves before SYNC_TIMEOUT_SECONDS (30 s here; nobody runs the job) ends its
    request's wait at once: its reply is no longer expected, and the job stays queued. Its retry with the same
    Idempotency-Key, which waits reading the record, stops reading once that client leaves too."""
    key = f"gives-up-{uuid.uuid4()}"
    job_id = job_id_for_idempotency_key(IMAGE_GENERATE, key)
    replies = server.services.replies
    body = {**PARAMS, "seed": 6}
    with pytest.raises(httpx.ReadTimeout):
        await server.client.post("/v1/images/generate", json=body, headers={"Idempotency-Key": key}, timeout=1)
    await asyncio.sleep(0.5)
    assert job_id not in replies._pending, "the reply is still awaited for a client that has gone"
    reads = _count_record_reads(server, monkeypatch, job_id)
    with pytest.raises(httpx.ReadTimeout):
        await server.client.post("/v1/images/generate", json=body, headers={"Idempotency-Key": key}, timeout=1.5)
    gave_up = time.monotonic()
    await asyncio.sleep(2)
    assert len(reads) >= 3, "the retry did not read the record while its client waited"
    assert not [at for at in reads if at > gave_up + 0.7], "the record was still read after the client left"
    job = (await server.client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "queued", job
    assert (await server.client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"wait_seconds": "-1"}, "wait_seconds: Expected `float` >= 0"),
        ({"wait_seconds": "31"}, "wait_seconds: Expected `float` <= 30"),
        ({"wait_seconds": "soon"}, "wait_seconds: Expected `float`"),
        ({"wait_seconds": "5", "while_status": "done"}, "while_status: Invalid enum value 'done'"),
    ],
)
async def test_a_wait_out_of_bounds_is_refused(server, params, says):
    job_id = await _queued_job(server, 5)
    response = await server.client.get(f"/v1/jobs/{job_id}", params=params)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_request"
    assert says in body["message"], body


async def test_a_long_poll_of_an_unknown_job_is_404_at_once(server):
    took = time.monotonic()
    response = await server.client.get("/v1/jobs/1b4e28ba-2fa1-11d2-883f-0016d3cca427", params={"wait_seconds": 10})
    assert response.status_code == 404 and response.json()["code"] == "job_not_found"
    assert time.monotonic() - took < 1
