"""HTTP callbacks: a job started with a callback_url has its end POSTed there, signed (checked with the Standard
Webhooks library), retried while the receiver fails, dead-lettered when it refuses; hosts not in CALLBACK_HOSTS are
refused by the API and again by the processor. A real HTTP server on loopback stands in for the receiver.

The server's own processor serves only callbacks (JOB_EVENTS_ENABLED=0: callbacks do not depend on events), so
jobs stay queued until a test starts a processor for generations on the same broker and store."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpcore
import msgspec
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from contract.callback_states import CallbackState, read_state, state_key, write_state
from contract.callbacks import JOB_CALLBACK, CallbackUrlError, JobCallbackV1, check_callback_url
from contract.events import JobFinishedV1, job_finished
from contract.jobs import JobRecord, JobStore, now_iso, withdrawn
from contract.messages import IMAGE_GENERATE
from infra.broker import ATTEMPTS_HEADER, REASON_CODE_HEADER, REASON_HEADER, Publisher, connect, retry_delay
from infra.settings import Settings
from infra.startup import StartupError
from infra.storage import StoredObject
from infra.storage.local import LocalStore
from processor.announcer import OWED_PREFIX, Announcer
from processor.handlers.callback_client import is_public, open_client
from processor.handlers.job_callback import deliver, retry_after_seconds
from processor.ops.callbacks import SAMPLE_PROMPT
from processor.outcomes import Failed
from processor.runtime import Runtime
from tests.support.amqp import drain, publish, wait_until
from tests.support.audio import speech_wav
from tests.support.backdate import written_days_ago
from tests.support.images import encoded
from tests.support.server import running_server
from tests.test_ops_cli import ams_ops_started
from tests.test_processor import consuming

PARAMS = {"prompt": "a job with a receiver", "width": 64, "height": 64, "steps": 2}


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


@dataclass
class Receiver:
    """A webhook receiver on loopback: each path answers the statuses scripted for it in turn (the last one from
    then on; 200 by default), after the delays scripted so, and every request is kept."""

    port: int = 0
    script: dict[str, list[int]] = field(default_factory=dict)
    delays: dict[str, list[float]] = field(default_factory=dict)
    answer_headers: dict[str, dict[str, str]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [request for request in self.received if request.path == path]

    def answer(self, path: str) -> int:
        return _next(self.script.get(path, [200]))

    def delay(self, path: str) -> float:
        return _next(self.delays.get(path, [0.0]))


def _next(script: list) -> object:
    """The next scripted value: each in turn, the last one from then on."""
    return script.pop(0) if len(script) > 1 else script[0]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            time.sleep(state.delay(self.path))
            state.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            status = state.answer(self.path)
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("location", "/followed")
            for name, value in state.answer_headers.get(self.path, {}).items():
                self.send_header(name, value)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def secrets() -> tuple[str, str]:
    return _secret(), _secret()


@pytest.fixture(scope="module")
def env(make_env, receiver, secrets) -> dict[str, str]:
    return make_env(
        IMAGE_ENABLED="1",
        IMAGE_SEARCH_ENABLED="0",
        PROCESSOR_CAPABILITIES="callback",
        CALLBACK_HOSTS=f"127.0.0.1:{receiver.port},*.example.com",
        CALLBACK_SECRET=",".join(secrets),
        JOB_EVENTS_ENABLED="0",
        CALLBACK_TIMEOUT_SECONDS="2",
        CALLBACK_ALLOW_PRIVATE_ADDRESSES="1",  # the receiver is on loopback
    )


@pytest.fixture(scope="module")
def settings(env) -> Settings:
    return Settings.from_env(env)


@pytest.fixture(scope="module")
def generating(env) -> Settings:
    """A processor for generations on the same deployment."""
    return Settings.from_env({**env, "PROCESSOR_CAPABILITIES": "image"})


@pytest.fixture(scope="module")
async def server(settings):
    async with running_server(settings) as running:
        yield running


async def _started(server, callback_url: str | None, seed: int = 1) -> str:
    body = {"type": IMAGE_GENERATE, "params": {**PARAMS, "seed": seed}, "callback_url": callback_url}
    response = await server.client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


async def _posts(receiver: Receiver, path: str, count: int, timeout: float = 30) -> list[Received]:
    await wait_until(lambda: len(receiver.at(path)) >= count, timeout=timeout)
    return receiver.at(path)


def _event(request: Received) -> JobFinishedV1:
    return msgspec.json.decode(request.body, type=JobFinishedV1)


async def test_a_finished_job_is_posted_to_its_callback_url_signed(server, generating, receiver, secrets):
    """The job's end, as GET shows it, is POSTed once it is stored; every key of CALLBACK_SECRET signs it."""
    path = f"/done/{uuid.uuid4()}"
    job_id = await _started(server, receiver.url(path))
    job = (await server.client.get(f"/v1/jobs/{job_id}")).json()
    assert (job["status"], job["callback_url"]) == ("queued", receiver.url(path))
    assert job["callback"] == {"state": "pending", "attempts": 0, "answer": None, "at": None}
    async with consuming(generating):
        [request] = await _posts(receiver, path, 1)
    event = _event(request)
    assert (event.job_id, event.status, event.type) == (job_id, "succeeded", IMAGE_GENERATE)
    assert await server.services.store.exists(event.result["key"])
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == event.event_id
    assert request.headers["user-agent"].startswith("ai-model-server-callbacks/")
    for secret in secrets:  # a receiver holding either key (a rotation) accepts it
        assert Webhook(secret).verify(request.body, request.headers)["job_id"] == job_id
    with pytest.raises(WebhookVerificationError):
        Webhook(_secret()).verify(request.body, request.headers)
    job = await _callback_settled(server, job_id)
    assert job["status"] == "succeeded" and job["finished_at"] == event.finished_at
    assert (job["callback"]["state"], job["callback"]["attempts"], job["callback"]["answer"]) == (
        "delivered",
        1,
        "answered 200",
    )


async def _callback_settled(server, job_id: str) -> dict:
    """The job, once its callback is no longer pending."""
    job: dict = {}

    async def settled() -> bool:
        job.update((await server.client.get(f"/v1/jobs/{job_id}")).json())
        return job["callback"]["state"] != "pending"

    await wait_until(settled, timeout=20)
    return job


async def test_a_job_without_callback_url_posts_nothing(server, generating, receiver):
    before = len(receiver.received)
    job_id = await _started(server, None)
    async with consuming(generating):
        await wait_until(lambda: _succeeded(server, job_id))
        await asyncio.sleep(0.5)
    assert len(receiver.received) == before


async def _succeeded(server, job_id: str) -> bool:
    return (await server.client.get(f"/v1/jobs/{job_id}")).json()["status"] == "succeeded"


async def test_the_job_says_what_became_of_its_callback(server, receiver):
    """retrying after a 503, delivered on the second try; failed (not retried) after a 404, with the answer."""
    flaky, gone = f"/flaky-job/{uuid.uuid4()}", f"/gone-job/{uuid.uuid4()}"
    receiver.script[flaky], receiver.script[gone] = [503, 200], [404]
    flaky_job, gone_job = await _started(server, receiver.url(flaky)), await _started(server, receiver.url(gone))
    for job_id in (flaky_job, gone_job):
        assert (await server.client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    store = server.services.store

    async def retrying() -> bool:
        state = await read_state(store, flaky_job)
        return state is not None and state.state == "retrying"

    await wait_until(retrying, timeout=20)
    job = (await server.client.get(f"/v1/jobs/{flaky_job}")).json()
    assert job["callback"]["state"] in ("retrying", "delivered")
    await _posts(receiver, flaky, 2, timeout=20)
    await wait_until(lambda: _callback_is(server, flaky_job, "delivered"), timeout=20)
    assert (await server.client.get(f"/v1/jobs/{flaky_job}")).json()["callback"]["attempts"] == 2
    job = await _callback_settled(server, gone_job)
    assert (job["callback"]["state"], job["callback"]["attempts"]) == ("failed", 1)
    assert "answered 404 Not Found" in job["callback"]["answer"]


async def _callback_is(server, job_id: str, state: str) -> bool:
    return (await server.client.get(f"/v1/jobs/{job_id}")).json()["callback"]["state"] == state


async def test_a_withdrawn_job_has_no_callback_to_wait_for(server, receiver):
    jobs = JobStore(server.services.store, 7)
    record = JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, dict(PARAMS), callback_url=receiver.url("/never"))
    await jobs.create(withdrawn(record, "RabbitMQ did not confirm it"))
    job = (await server.client.get(f"/v1/jobs/{record.job_id}")).json()
    assert (job["status"], job["callback_url"], job["callback"]) == ("failed", receiver.url("/never"), None)


async def test_callback_states_are_swept_with_the_records(server):
    store = server.services.store
    old, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    for job_id, at in ((old, "2020-01-01T00:00:00.000000Z"), (fresh, datetime.now(UTC).isoformat())):
        state = CallbackState(event_id=str(uuid.uuid4()), state="delivered", attempts=1, answer="answered 200", at=at)
        await write_state(store, job_id, state)
    written_days_ago(server.services.settings.local_storage_dir, state_key(old), 2000)
    await JobStore(store, 7).sweep()
    assert await read_state(store, old) is None
    assert await read_state(store, fresh) is not None


async def test_a_callback_state_written_while_the_sweep_reads_the_old_one_is_kept(tmp_path, monkeypatch):
    """A callback tried again just as the sweep reads its old state (last tried long ago) writes a fresh one between
    that read and the sweep's delete: the fresh state stays."""
    store = LocalStore(tmp_path / "store")
    job_id = str(uuid.uuid4())
    old = CallbackState(event_id="e", state="failed", attempts=5, answer="answered 500", at="2020-01-01T00:00:00Z")
    fresh = CallbackState(event_id="e", state="delivered", attempts=6, answer="answered 200", at=now_iso())
    await write_state(store, job_id, old)
    written_days_ago(tmp_path / "store", state_key(job_id), 2000)
    read = store.get

    async def read_then_tried_again(key: str, **kwargs: object) -> StoredObject:
        found = await read(key, **kwargs)
        if key == state_key(job_id):
            await write_state(store, job_id, fresh)
        return found

    monkeypatch.setattr(store, "get", read_then_tried_again)
    await JobStore(store, 7).sweep()
    assert await read_state(store, job_id) == fresh


async def test_a_cancelled_job_posts_its_cancellation(server, receiver):
    path = f"/cancelled/{uuid.uuid4()}"
    job_id = await _started(server, receiver.url(path))
    response = await server.client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.text
    [request] = await _posts(receiver, path, 1)
    event = _event(request)
    assert (event.job_id, event.status, event.error.code) == (job_id, "failed", "cancelled")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://10.0.0.7/hook", "not allowed"),
        ("http://127.0.0.1:1/hook", "not allowed"),
        ("https://example.com/hook", "not allowed"),
        ("https://user:pw@hooks.example.com/hook", "user name, password"),
        ("https://hooks.example.com/hook#part", "#fragment"),
        ("https://hooks.example.com:99999/hook", "not a URL"),
    ],
)
async def test_a_callback_url_not_allowed_is_refused_and_nothing_is_recorded(server, url, why):
    body = {"type": IMAGE_GENERATE, "params": PARAMS, "callback_url": url}
    before = [info.key async for info in server.services.store.list("jobs/")]
    response = await server.client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "callback_not_allowed"
    assert why in response.json()["message"]
    assert [info.key async for info in server.services.store.list("jobs/")] == before


@pytest.mark.parametrize(
    "url", ["ftp://hooks.example.com/hook", "not a url", "https://hooks.example.com/" + "a" * 2100]
)
async def test_a_callback_url_that_breaks_the_schema_is_a_400(server, url):
    body = {"type": IMAGE_GENERATE, "params": PARAMS, "callback_url": url}
    response = await server.client.post("/v1/jobs", json=body)
    assert response.status_code == 400
    assert "callback_url" in response.text


def test_callback_hosts_allow_hosts_ports_and_subdomains():
    hosts = ("hooks.example.com", "*.internal.example:8443", "[::1]:9000", "10.1.2.3")
    assert check_callback_url("https://hooks.example.com/x?y=1", hosts)
    assert check_callback_url("http://hooks.example.com:8080/x", hosts)  # no port listed: any port
    assert check_callback_url("https://a.b.internal.example:8443/x", hosts)
    assert check_callback_url("http://[::1]:9000/x", hosts)
    assert check_callback_url("http://10.1.2.3/x", hosts)
    for refused in (
        "https://internal.example:8443/x",  # *.domain: not the domain itself
        "https://a.internal.example/x",  # port 443, not 8443
        "http://[::1]/x",
        "https://hooks.example.com.evil.test/x",
        "https://evilhooks.example.com/x",
        "https://a b.internal.example:8443/x",  # a space
        "https://a.internal.example:8443/x\ny",  # a control character
        "https://a..internal.example:8443/x",  # not a host name
        "https://%41.internal.example:8443/x",
    ):
        with pytest.raises(CallbackUrlError):
            check_callback_url(refused, hosts)
    with pytest.raises(CallbackUrlError, match="CALLBACK_HOSTS is empty"):
        check_callback_url("https://hooks.example.com/x", ())


async def test_a_failing_receiver_gets_the_callback_again(server, receiver, settings):
    """503, then 200: delivered on the second try (through the 1 s retry queue), under the same webhook-id."""
    path = f"/flaky/{uuid.uuid4()}"
    receiver.script[path] = [503, 200]
    job_id = await _direct_callback(settings, receiver.url(path))
    requests = await _posts(receiver, path, 2, timeout=20)
    assert len({request.headers["webhook-id"] for request in requests}) == 1
    assert all(_event(request).job_id == job_id for request in requests)


async def test_a_receiver_asking_to_retry_later_is_not_called_sooner(server, receiver, settings):
    """429 with Retry-After: 3: the retry waits in the 5 s delay queue instead of the first retry's 1 s one."""
    path = f"/busy/{uuid.uuid4()}"
    receiver.script[path], receiver.answer_headers[path] = [429, 200], {"retry-after": "3"}
    await _direct_callback(settings, receiver.url(path))
    first, second = await _posts(receiver, path, 2, timeout=20)
    assert second.at - first.at >= 4.5


async def test_a_receiver_that_answers_too_late_gets_the_callback_again(server, receiver, settings):
    """The first try waits past CALLBACK_TIMEOUT_SECONDS (2 s here) and is retried: delivered on the second."""
    path = f"/late/{uuid.uuid4()}"
    receiver.delays[path] = [3.0, 0.0]
    job_id = await _direct_callback(settings, receiver.url(path))
    requests = await _posts(receiver, path, 2, timeout=20)
    assert requests[0].headers["webhook-id"] == requests[1].headers["webhook-id"]
    dead = await drain(settings.amqp_url, "ams.dead", 1.0)
    assert [message for message in dead if message.type == JOB_CALLBACK and _event_of(message).job_id == job_id] == []


async def test_a_receiver_that_refuses_dead_letters_the_callback(server, receiver, settings):
    """A 404, or a redirect (not followed), is not retried: the callback waits in ams.dead for an operator."""
    gone, moved = f"/gone/{uuid.uuid4()}", f"/moved/{uuid.uuid4()}"
    receiver.script[gone], receiver.script[moved] = [404], [302]
    gone_job = await _direct_callback(settings, receiver.url(gone))
    moved_job = await _direct_callback(settings, receiver.url(moved))
    dead = await _dead_letters(settings, 2)
    assert {message.headers[REASON_CODE_HEADER] for message in dead} == {"callback_refused"}
    reasons = {_event_of(message).job_id: message.headers[REASON_HEADER] for message in dead}
    assert "answered 404 Not Found" in reasons[gone_job] and "answered 302 Found" in reasons[moved_job]
    assert [len(receiver.at(gone)), len(receiver.at(moved)), len(receiver.at("/followed"))] == [1, 1, 0]


async def test_a_callback_whose_job_id_is_no_storage_key_is_delivered_all_the_same(server, receiver, settings):
    """An upstream job.callback may name any job id: its state cannot be written under it, and the callback is
    delivered and settled all the same (not dead-lettered as a crash)."""
    path = f"/odd-id/{uuid.uuid4()}"
    record = msgspec.structs.replace(_finished(receiver.url(path)), job_id="../outside")
    _, event = job_finished(record)
    body = msgspec.json.encode(JobCallbackV1(url=receiver.url(path), event=event))
    await publish(settings.amqp_url, JOB_CALLBACK, body, message_id=event.event_id)
    [request] = await _posts(receiver, path, 1)
    assert _event(request).job_id == "../outside"
    await asyncio.sleep(0.5)  # settled
    dead = await drain(settings.amqp_url, "ams.dead", 1.0)
    assert [message for message in dead if message.message_id == event.event_id] == []


async def test_the_processor_refuses_a_callback_to_a_host_it_does_not_allow(server, receiver, settings):
    """A job.callback from upstream naming another host is dead-lettered unsent."""
    await _direct_callback(settings, "http://10.0.0.7/hook")
    [dead] = await _dead_letters(settings, 1)
    assert dead.headers[REASON_CODE_HEADER] == "callback_not_allowed"
    assert int(dead.headers.get(ATTEMPTS_HEADER, 1)) == 1


async def test_a_callback_owed_while_rabbitmq_refused_is_posted_later(server, receiver, settings):
    """Announced without RabbitMQ, the callback is owed in the store; published once RabbitMQ takes messages, it is
    delivered as usual."""
    path = f"/owed/{uuid.uuid4()}"
    record = _finished(receiver.url(path))
    store = server.services.store
    assert not await Announcer(None, store, events=False).announce(record)
    owed = [info.key async for info in store.list(OWED_PREFIX)]
    assert len(owed) == 1
    assert json.loads((await store.get(owed[0])).data)["callback_url"] == receiver.url(path)
    connection = await connect(settings.amqp_url)
    try:
        assert await Announcer(await Publisher.open(connection), store, events=False).publish_owed() == 1
    finally:
        await connection.close()
    [request] = await _posts(receiver, path, 1)
    assert _event(request).job_id == record.job_id
    assert [info.key async for info in store.list(OWED_PREFIX)] == []


async def test_a_slow_receiver_does_not_hold_up_a_generation(make_env, receiver, secrets):
    """One processor serving generations and callbacks: a generation queued behind a callback whose receiver takes
    4 s is done before the callback is."""
    path = f"/slow/{uuid.uuid4()}"
    receiver.delays[path] = [4.0]
    env = make_env(
        IMAGE_ENABLED="1",
        IMAGE_SEARCH_ENABLED="0",
        PROCESSOR_CAPABILITIES="image,callback",
        CALLBACK_HOSTS=f"127.0.0.1:{receiver.port}",
        CALLBACK_SECRET=secrets[0],
        CALLBACK_TIMEOUT_SECONDS="10",
        CALLBACK_ALLOW_PRIVATE_ADDRESSES="1",
    )
    settings = Settings.from_env(env)
    async with consuming(settings) as runtime:
        await _direct_callback(settings, receiver.url(path))
        await asyncio.sleep(0.3)  # the callback is on its way
        generation = await publish(settings.amqp_url, IMAGE_GENERATE, PARAMS)
        key = f"images/generated/{generation}.png"
        await wait_until(lambda: runtime.store.exists(key), timeout=20)
        assert receiver.at(path) == []  # the receiver is still answering
        await _posts(receiver, path, 1)


async def test_a_processor_serving_callbacks_needs_a_secret(make_env, receiver):
    env = make_env(IMAGE_ENABLED="0", IMAGE_SEARCH_ENABLED="0", CALLBACK_HOSTS=f"127.0.0.1:{receiver.port}")
    settings = Settings.from_env(env)
    assert settings.processor_capabilities == ("callback",)
    with pytest.raises(StartupError, match="CALLBACK_SECRET"):
        await Runtime.open(settings)


def _finished(url: str) -> JobRecord:
    record = JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, dict(PARAMS), callback_url=url)
    return msgspec.structs.replace(record, status="succeeded", finished_at=record.created_at, result={"key": "k"})


async def _direct_callback(settings: Settings, url: str) -> str:
    """Publish a job.callback as an announcement does, for a job that ended; its job id."""
    record = _finished(url)
    _, event = job_finished(record)
    body = msgspec.json.encode(JobCallbackV1(url=url, event=event))
    await publish(settings.amqp_url, JOB_CALLBACK, body, message_id=event.event_id)
    return record.job_id


def _event_of(message) -> JobFinishedV1:
    return msgspec.json.decode(message.body, type=JobCallbackV1).event


async def _dead_letters(settings: Settings, count: int, timeout: float = 20) -> list:
    found: list = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        found += [
            message for message in await drain(settings.amqp_url, "ams.dead", 1.0) if message.type == JOB_CALLBACK
        ]
    assert len(found) == count, f"{len(found)} of {count} dead letters"
    return found


async def test_the_openapi_document_describes_the_callback(server):
    """On POST /v1/jobs (the URL in the body), and on each endpoint that takes ?callback_url=."""
    document = (await server.client.get("/schema/openapi.json")).json()
    taking = {
        "/v1/jobs": "{$request.body#/callback_url}",
        "/v1/images": "{$request.query.callback_url}",
        **dict.fromkeys(SEED_ENDPOINTS, "{$request.query.callback_url}"),
    }
    described = {
        path: item["post"]["callbacks"]
        for path, item in document["paths"].items()
        if "callbacks" in item.get("post", {})
    }
    assert set(described) == set(taking)
    for path, url in taking.items():
        callback = described[path]["jobEnded"][url]["post"]
        assert {parameter["name"] for parameter in callback["parameters"]} == {
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
        }
        body = callback["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/JobFinishedV1"}
    event = document["components"]["schemas"]["JobFinishedV1"]
    assert set(event["properties"]) == set(JobFinishedV1.__struct_fields__)
    assert document["components"]["schemas"]["ErrorInfo"]["required"] == ["code", "message"]


async def _ams_ops(env: dict[str, str], *args: str) -> tuple[int, str]:
    process = await ams_ops_started(env, *args)
    stdout, stderr = await process.communicate()
    return process.returncode or 0, stdout.decode() + stderr.decode()


async def test_ams_ops_sends_a_sample_end_to_try_a_receiver(env, receiver, secrets):
    path = f"/try/{uuid.uuid4()}"
    code, output = await _ams_ops(env, "callbacks", "send", receiver.url(path))
    assert code == 0, output
    assert output.startswith(f"delivered: {receiver.url(path)} answered 200")
    [request] = receiver.at(path)
    assert Webhook(secrets[1]).verify(request.body, request.headers)["params"] == {"prompt": SAMPLE_PROMPT}


async def test_ams_ops_sends_a_jobs_end_again(server, env, receiver):
    """A cancelled job's callback, sent again by hand: the same end, under the same webhook-id."""
    path = f"/again/{uuid.uuid4()}"
    job_id = await _started(server, receiver.url(path))
    assert (await server.client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    [first] = await _posts(receiver, path, 1)
    code, output = await _ams_ops(env, "callbacks", "send", "--job-id", job_id, "--json")
    assert code == 0, output
    assert json.loads(output) == {
        "url": receiver.url(path),
        "job_id": job_id,
        "event_id": first.headers["webhook-id"],
        "delivered": True,
        "detail": "answered 200",
    }
    [_, second] = receiver.at(path)
    assert second.body == first.body and second.headers["webhook-id"] == first.headers["webhook-id"]


async def test_ams_ops_says_why_a_callback_was_not_delivered(server, env, receiver):
    gone = f"/gone/{uuid.uuid4()}"
    receiver.script[gone] = [404]
    code, output = await _ams_ops(env, "callbacks", "send", receiver.url(gone))
    assert code == 1 and "not delivered" in output and "callback_refused" in output and "404" in output
    code, output = await _ams_ops(env, "callbacks", "send", "http://10.0.0.7/hook")
    assert code == 1 and "callback_not_allowed" in output
    queued = await _started(server, None)
    for job_id, why in ((queued, "has not ended (queued)"), (str(uuid.uuid4()), "no job record")):
        code, output = await _ams_ops(env, "callbacks", "send", "--job-id", job_id)
        assert code == 1 and why in output, output
    code, output = await _ams_ops({**env, "CALLBACK_SECRET": ""}, "callbacks", "send", receiver.url(gone))
    assert code == 2 and "CALLBACK_SECRET is not set" in output


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # shared (carrier-grade NAT)
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:10.0.0.1", False),
        # IPv6 forms of an IPv4 address, reached through a translator where there is one, count as the IPv4 address
        ("64:ff9b::a00:7", False),  # NAT64 (DNS64 answers so in IPv6-only networks): 10.0.0.7
        ("64:ff9b::a9fe:a9fe", False),  # NAT64: 169.254.169.254
        ("64:ff9b::5db8:d822", True),  # NAT64: 93.184.216.34
        ("64:ff9b:1::a00:7", False),  # the local-use NAT64 prefix
        ("2002:a9fe:a9fe::1", False),  # 6to4: 169.254.169.254
        ("2002:5db8:d822::1", True),  # 6to4: 93.184.216.34
        ("::7f00:1", False),  # IPv4-compatible: 127.0.0.1
        ("::ffff:0:a00:1", False),  # IPv4-translated (SIIT): 10.0.0.1
        ("fec0::1", False),  # site-local
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:93.184.216.34", True),
    ],
)
def test_which_addresses_are_public(address, public):
    assert is_public(address) is public


async def test_a_callback_to_a_private_address_is_not_sent(env, receiver):
    """By default a callback connects to public addresses only: the loopback receiver, allowed by CALLBACK_HOSTS by
    address and by name, gets nothing, and the callback is refused for good."""
    settings = Settings.from_env({**env, "CALLBACK_ALLOW_PRIVATE_ADDRESSES": "0"})
    settings = dataclasses.replace(settings, callback_hosts=(*settings.callback_hosts, "localhost"))
    path = f"/private/{uuid.uuid4()}"
    for url in (receiver.url(path), f"http://localhost:{receiver.port}{path}"):
        async with open_client(settings) as client:
            outcome = await deliver(
                client, _callback(url), hosts=settings.callback_hosts, secrets=settings.callback_secrets
            )
        assert isinstance(outcome, Failed) and not outcome.transient
        assert outcome.code == "callback_not_allowed" and "not a public address" in outcome.message
    assert receiver.at(path) == []


async def _deliver_resolving(env, monkeypatch, resolve) -> tuple[object, list[tuple[str, int]]]:
    """Deliver a callback to hooks.example.com (private addresses refused), its name answered by `resolve`
    and no connection made: the outcome, and where it tried to connect."""
    settings = Settings.from_env({**env, "CALLBACK_ALLOW_PRIVATE_ADDRESSES": "0"})
    settings = dataclasses.replace(settings, callback_hosts=("hooks.example.com",))
    connected: list[tuple[str, int]] = []

    async def connect(self, host, port, *args, **kwargs):
        connected.append((host, port))
        raise httpcore.ConnectError("no network in the test")

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", resolve)
    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", connect)
    async with open_client(settings) as client:
        outcome = await deliver(
            client, _callback("http://hooks.example.com/x"), hosts=settings.callback_hosts, secrets=(b"k" * 32,)
        )
    return outcome, connected


async def test_a_callback_connects_to_the_address_it_checked(env, monkeypatch):
    """The host is resolved once, and the connection goes to the public address found, not to whatever the name
    resolves to a moment later (DNS rebinding)."""
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80))]])

    async def resolve(self, host, port, **kwargs):
        return next(answers, [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))])

    outcome, connected = await _deliver_resolving(env, monkeypatch, resolve)
    assert connected == [("93.184.216.34", 80)]
    assert isinstance(outcome, Failed) and outcome.transient and outcome.code == "callback_failed"


async def test_a_callback_does_not_reach_a_private_address_through_nat64(env, monkeypatch):
    """In an IPv6-only network DNS64 answers for an IPv4 address with 64:ff9b::<that address>, and the network's
    NAT64 gateway connects to it: a name answered so for a private address is refused unsent, as the address is."""

    async def resolve(self, host, port, **kwargs):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("64:ff9b::a9fe:a9fe", port, 0, 0))]

    outcome, connected = await _deliver_resolving(env, monkeypatch, resolve)
    assert connected == []
    assert isinstance(outcome, Failed) and not outcome.transient and outcome.code == "callback_not_allowed"


@pytest.mark.parametrize(
    "trickle",
    [
        b"HTTP/1.1 102 Processing\r\n\r\n",  # interim answers, each whole, without end
        b"x",  # a header's bytes, one at a time
    ],
    ids=["interim answers", "header bytes"],
)
async def test_a_receiver_that_keeps_answering_slowly_is_cut_off(env, trickle):
    """Each read of the answer waits at most CALLBACK_TIMEOUT_SECONDS, and a receiver sending a little more before
    each wait ends would hold the POST for good: the whole POST is cut off at twice the timeout, and retried."""
    settings = Settings.from_env({**env, "CALLBACK_TIMEOUT_SECONDS": "0.5"})
    stop = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"" if trickle.startswith(b"HTTP") else b"HTTP/1.1 200 OK\r\nx-slow: ")
        with contextlib.suppress(ConnectionError):
            while not stop.is_set():
                writer.write(trickle)
                await writer.drain()
                await asyncio.sleep(0.2)
        writer.close()

    listening = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/slow"
    started = time.monotonic()
    try:
        async with open_client(settings) as client, asyncio.timeout(10):
            outcome = await deliver(client, _callback(url), hosts=(f"127.0.0.1:{port}",), secrets=(b"k" * 32,))
    finally:
        stop.set()
        listening.close()
    assert time.monotonic() - started < 3
    assert isinstance(outcome, Failed) and outcome.transient and outcome.code == "callback_failed"
    assert "within 1 s" in outcome.message


def _callback(url: str) -> JobCallbackV1:
    return JobCallbackV1(url=url, event=job_finished(_finished(url))[1])


async def test_an_upload_that_does_not_wait_posts_its_indexing_end(make_env, receiver, secrets):
    """POST /v1/images?wait=false&callback_url=...: the indexing job's end is POSTed once the image is searchable; a
    callback_url not allowed is a 422 with nothing stored."""
    env = make_env(
        CALLBACK_HOSTS=f"127.0.0.1:{receiver.port}",
        CALLBACK_SECRET=secrets[0],
        CALLBACK_ALLOW_PRIVATE_ADDRESSES="1",
    )
    path = f"/indexed/{uuid.uuid4()}"
    async with running_server(Settings.from_env(env)) as running:
        files = {"file": ("cat.png", encoded(3), "image/png")}
        refused = await running.client.post(
            "/v1/images", params={"wait": "false", "callback_url": "http://10.0.0.7/hook"}, files=files
        )
        assert refused.status_code == 422 and refused.json()["code"] == "callback_not_allowed"
        assert await running.services.index.count() == 0
        response = await running.client.post(
            "/v1/images", params={"wait": "false", "callback_url": receiver.url(path)}, files=files
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        [request] = await _posts(receiver, path, 1)
        event = _event(request)
        assert (event.job_id, event.type, event.status) == (job_id, "image.index", "succeeded")
        assert await running.services.index.get(event.result["id"]) is not None


async def test_a_generation_answered_at_once_posts_its_end_all_the_same(server, generating, receiver):
    """POST /v1/images/generate?callback_url=...: the client gets the PNG, and the receiver the job's end."""
    path = f"/answered/{uuid.uuid4()}"
    async with consuming(generating):
        response = await server.client.post(
            "/v1/images/generate", params={"callback_url": receiver.url(path)}, json={**PARAMS, "seed": 7}
        )
        assert response.status_code == 200, response.text
        [request] = await _posts(receiver, path, 1)
    event = _event(request)
    assert (event.job_id, event.status, event.result["seed"]) == (response.headers["x-job-id"], "succeeded", 7)


SEED_ENDPOINTS = ("/v1/images/generate", "/v1/r2/images/generate", "/v1/voice/generate", "/v1/r2/voice/generate")


def _seed_request(endpoint: str, clip: bytes) -> dict:
    """The request arguments of one of the seed's generation endpoints."""
    voice = {"ref_text": "Hello there.", "text": "Good morning.", "language": "English"}
    if endpoint.endswith("/images/generate"):
        return {"json": PARAMS}
    if endpoint == "/v1/voice/generate":
        return {"data": voice, "files": {"ref_audio": ("ref.wav", clip, "audio/wav")}}
    return {"json": {**voice, "ref_audio_key": "voice/refs/ref.wav"}}


async def test_the_seed_endpoints_take_a_callback_url(make_env, s3, receiver, secrets):
    """?callback_url= on the seed's four generation endpoints: one not allowed is a 422 with nothing recorded; an
    allowed one is the job's (202 past SYNC_TIMEOUT_SECONDS here: no processor generates), and the job's end, a
    cancellation, is POSTed there."""
    bucket = s3.new_bucket()
    env = make_env(
        r2_bucket=bucket,
        endpoint=s3.endpoint,
        IMAGE_ENABLED="1",
        VOICE_ENABLED="1",
        IMAGE_SEARCH_ENABLED="0",
        PROCESSOR_CAPABILITIES="callback",
        CALLBACK_HOSTS=f"127.0.0.1:{receiver.port}",
        CALLBACK_SECRET=secrets[0],
        CALLBACK_ALLOW_PRIVATE_ADDRESSES="1",
        SYNC_TIMEOUT_SECONDS="0.2",
    )
    clip = speech_wav()
    s3.client.put_object(Bucket=bucket, Key="voice/refs/ref.wav", Body=clip)
    async with running_server(Settings.from_env(env)) as running:
        for endpoint in SEED_ENDPOINTS:
            before = [info.key async for info in running.services.store.list("jobs/")]
            refused = await running.client.post(
                endpoint, params={"callback_url": "http://10.0.0.7/hook"}, **_seed_request(endpoint, clip)
            )
            assert (refused.status_code, refused.json()["code"]) == (422, "callback_not_allowed"), endpoint
            assert [info.key async for info in running.services.store.list("jobs/")] == before
            path = f"/seed/{uuid.uuid4()}"
            response = await running.client.post(
                endpoint, params={"callback_url": receiver.url(path)}, **_seed_request(endpoint, clip)
            )
            assert response.status_code == 202, (endpoint, response.text)
            job_id = response.json()["job_id"]
            job = (await running.client.get(f"/v1/jobs/{job_id}")).json()
            assert job["callback_url"] == receiver.url(path)
            assert (await running.client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
            [request] = await _posts(receiver, path, 1)
            assert (_event(request).job_id, _event(request).error.code) == (job_id, "cancelled")


def test_retry_after_picks_the_shortest_delay_queue_that_waits_long_enough():
    assert [retry_delay(1, wait) for wait in (0, 1, 3, 5, 6, 31, 500)] == [1, 1, 5, 5, 30, 120, 120]
    assert retry_delay(3, 2) == 30  # never sooner than the attempt's own delay
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: at once
    assert 3500 < retry_after_seconds(email.utils.format_datetime(datetime.now(UTC) + timedelta(hours=1))) <= 3600
    assert [retry_after_seconds(value) for value in (None, "", "soon", "-5")] == [None] * 4


async def test_a_host_name_idna_refuses_is_not_sent_nor_retried(settings):
    async with open_client(settings) as client:
        outcome = await deliver(
            client, _callback("http://xn--zz.example.com/x"), hosts=("*.example.com",), secrets=(b"k" * 32,)
        )
    assert isinstance(outcome, Failed) and not outcome.transient and outcome.code == "callback_not_allowed"
