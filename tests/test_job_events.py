"""Job events on ams.events: a job with a record announces its end once it is durable, before its message is
acked; a cancellation is announced by the API at once and again by the processor that takes the message, under
the same event id; an event RabbitMQ did not take is announced by the redelivery. A test queue bound to the
exchange stands in for a subscriber. The API runs alone (python -m api), so jobs stay queued until a test starts a
processor on the same broker and store."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import msgspec
import pytest

from api.schemas import ImageOut
from contract.events import JOB_FINISHED, JobFinishedV1, job_finished
from contract.jobs import JobStore, record_headers
from contract.messages import IMAGE_GENERATE, IMAGE_INDEX
from contract.metrics import REGISTRY
from infra.broker import EVENTS_EXCHANGE, JOBS_EXCHANGE, BrokerUnavailableError, Publisher, connect
from infra.settings import Settings
from infra.vectors import ImageRecord
from processor import announcer
from processor.announcer import OWED_PREFIX, OwedEvent
from tests.support.amqp import next_reply, publish, wait_until
from tests.support.server import running_server
from tests.test_processor import consuming, vhost_of

PARAMS = {"prompt": "a job with an audience", "width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module", params=["embedded store", "R2"])
def settings(request, make_env, s3) -> Settings:
    """Owed events live in the object store: every test runs on the embedded store and on R2's API (moto)."""
    r2 = {"r2_bucket": s3.new_bucket(), "endpoint": s3.endpoint} if request.param == "R2" else {}
    env = make_env(IMAGE_ENABLED="1", IMAGE_SEARCH_ENABLED="0", PROCESSOR_CAPABILITIES="image", **r2)
    return Settings.from_env(env)


@pytest.fixture(scope="module")
async def server(settings):
    async with running_server(settings, with_processor=False) as running:
        yield running


@pytest.fixture
async def events(settings) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """A subscriber's queue, bound to every event."""
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(EVENTS_EXCHANGE, routing_key="#")
        yield queue
    finally:
        await connection.close()


async def _next_event(queue, timeout: float = 30) -> aio_pika.abc.AbstractIncomingMessage:
    message = await next_reply(queue, timeout)
    assert message is not None, f"no event within {timeout} s"
    return message


async def _nothing_more(queue, seconds: float = 1.0) -> None:
    assert await next_reply(queue, seconds) is None


def _event(message) -> JobFinishedV1:
    assert (message.type, message.content_type) == (JOB_FINISHED, "application/json")
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    event = msgspec.json.decode(message.body, type=JobFinishedV1)
    assert message.message_id == event.event_id
    return event


def _queue_empty(rabbit, settings: Settings) -> bool:
    return rabbit.queue_counts(vhost_of(settings))["ams.image"] == (0, 0)


async def _queued_job(server, seed: int) -> str:
    response = await server.client.post("/v1/jobs", json={"type": IMAGE_GENERATE, "params": {**PARAMS, "seed": seed}})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def _counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("ams_job_events_total", {"outcome": outcome}) or 0


async def test_a_generation_announces_its_end_once_it_is_stored(server, settings, events):
    job_id = await _queued_job(server, 1)
    published = _counted("published")
    async with consuming(settings):
        message = await _next_event(events)
        event = _event(message)
        assert message.routing_key == "image.generate.succeeded"
        assert (event.job_id, event.type, event.status, event.attempts) == (job_id, IMAGE_GENERATE, "succeeded", 1)
        assert event.params["prompt"] == PARAMS["prompt"] and event.error is None
        assert event.result["key"] == f"images/generated/{job_id}.png" and event.result["seed"] == 1
        assert await server.services.store.exists(event.result["key"])  # stored before it was announced
        job = (await server.client.get(f"/v1/jobs/{job_id}")).json()
        assert (job["status"], job["finished_at"], job["started_at"]) == (
            "succeeded",
            event.finished_at,
            event.started_at,
        )
        await _nothing_more(events)
    assert _counted("published") == published + 1


async def test_a_refused_job_announces_its_failure(server, settings, events):
    """A message with a record that breaks the contract is dead-lettered, its record failed, its end announced."""
    jobs = JobStore(server.services.store, 7)
    job_id = str(uuid.uuid4())
    record = JobStore.new(job_id, IMAGE_GENERATE, {"prompt": ""})
    etag = await jobs.create(record)
    await publish(
        settings.amqp_url, IMAGE_GENERATE, {"prompt": ""}, message_id=job_id, headers=record_headers(record, etag)
    )
    async with consuming(settings):
        message = await _next_event(events)
    event = _event(message)
    assert message.routing_key == "image.generate.failed"
    assert (event.job_id, event.status, event.error.code) == (job_id, "failed", "schema_violation")
    assert (await jobs.get(job_id)).status == "failed"


async def test_a_cancellation_is_announced_at_once_and_again_when_its_message_comes_up(server, settings, events):
    job_id = await _queued_job(server, 2)
    assert (await server.client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    message = await _next_event(events, timeout=5)  # from the API, with no processor running
    event = _event(message)
    assert message.routing_key == "image.generate.failed"
    assert (event.job_id, event.status, event.error.code) == (job_id, "failed", "cancelled")
    assert (await server.client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    await _nothing_more(events, 0.5)  # cancelling again announces nothing new
    async with consuming(settings):
        again = _event(await _next_event(events))  # the processor acks the message unrun, announcing it again
    assert again == event


async def test_an_event_rabbitmq_did_not_take_is_owed_and_published_later(
    server, settings, events, rabbit, monkeypatch
):
    """The job is acknowledged as usual (nothing waits on RabbitMQ); its event waits in the store and is published
    as soon as RabbitMQ takes it, then removed."""
    job_id = await _queued_job(server, 3)
    store = server.services.store
    owed, late = _counted("owed"), _counted("published_late")
    async with consuming(settings) as runtime:
        publisher = runtime.plumbing.publisher
        announce = publisher.announce
        refused = []

        async def refused_once(**kwargs) -> None:
            if not refused:
                refused.append(kwargs["message_id"])
                assert [info.key async for info in store.list(OWED_PREFIX)] == []
                raise BrokerUnavailableError("could not publish job.finished event: a test refused it")
            assert [info.key async for info in store.list(OWED_PREFIX)] == [f"{OWED_PREFIX}{refused[0]}.json"]
            await announce(**kwargs)

        monkeypatch.setattr(publisher, "announce", refused_once)
        event = _event(await _next_event(events))
        assert refused == [event.event_id]
        await wait_until(lambda: _queue_empty(rabbit, settings), timeout=10)  # acknowledged
    assert (event.job_id, event.status, event.attempts) == (job_id, "succeeded", 1)  # run once
    assert [info.key async for info in store.list(OWED_PREFIX)] == []
    assert (_counted("owed"), _counted("published_late")) == (owed + 1, late + 1)
    await _nothing_more(events, 0.5)


async def _owe(store, prompt: str) -> JobFinishedV1:
    """An event owed by someone else (a stopped processor, an operator's cancellation without RabbitMQ)."""
    record = JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, {"prompt": prompt})
    record.status, record.finished_at, record.attempts = "succeeded", record.created_at, 1
    routing_key, event = job_finished(record)
    owed = msgspec.json.encode(OwedEvent(routing_key=routing_key, event=event))
    await store.put(f"{OWED_PREFIX}{event.event_id}.json", owed, "application/json")
    return event


async def test_events_others_owed_are_published_at_start_up_and_by_the_periodic_look(
    server, settings, events, monkeypatch
):
    monkeypatch.setattr(announcer, "SWEEP_SECONDS", 0.5)
    store = server.services.store
    before = await _owe(store, "owed before the processor started")
    async with consuming(settings):
        message = await _next_event(events, timeout=10)
        assert message.routing_key == "image.generate.succeeded" and _event(message) == before
        after = await _owe(store, "owed while it runs, by someone else")
        assert _event(await _next_event(events, timeout=10)) == after

        async def none_owed() -> bool:  # deleted once published
            return [info.key async for info in store.list(OWED_PREFIX)] == []

        await wait_until(none_owed, timeout=10)


async def test_no_event_with_job_events_off(server, settings, events):
    """Nor are events owed published: they wait in the store for a processor with events on."""
    job_id = await _queued_job(server, 4)
    store = server.services.store
    owed = await _owe(store, "owed before events were turned off")
    async with consuming(dataclasses.replace(settings, job_events_enabled=False)):

        async def done() -> bool:
            return (await server.client.get(f"/v1/jobs/{job_id}")).json()["status"] == "succeeded"

        await wait_until(done, timeout=30)
    await _nothing_more(events, 0.5)
    assert [info.key async for info in store.list(OWED_PREFIX)] == [f"{OWED_PREFIX}{owed.event_id}.json"]
    await store.delete(f"{OWED_PREFIX}{owed.event_id}.json")


def test_the_documented_event_is_one():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "messages.md").read_text()
    section = doc.split("## Job events", 1)[1].split("\n## ", 1)[0]
    example = section.split("```json\n", 1)[1].split("```", 1)[0]
    event = msgspec.json.decode(example, type=JobFinishedV1)
    assert (event.type, event.status, event.result["key"]) == (
        IMAGE_GENERATE,
        "succeeded",
        f"images/generated/{event.job_id}.png",
    )


def test_an_uploads_end_shows_the_image_as_the_api_does_without_links():
    """An image.index job's result is the index's record of the image; its end shows it as `GET /v1/jobs/{id}`
    and `GET /v1/images/{id}` do, without links: the index's own fields (created_us, thumbnail) left out."""
    image_id = str(uuid.uuid4())
    image = ImageRecord(
        id=image_id,
        r2_key=f"images/originals/{image_id}.png",
        content_type="image/png",
        size=1234,
        width=64,
        height=48,
        created_at="2026-12-07T23:00:00Z",
        created_us=1_796_684_400_000_000,
        source="upload",
        filename="cat.png",
        thumbnail=True,
    )
    record = msgspec.structs.replace(
        JobStore.new(image_id, IMAGE_INDEX, {"source": "upload"}),
        status="succeeded",
        finished_at="2026-12-07T23:00:01Z",
        result=msgspec.to_builtins(image),
    )
    _, event = job_finished(record)
    shown = set(ImageOut.__struct_fields__) - {"file_url", "thumbnail_url"}
    assert event.result == {name: value for name, value in msgspec.to_builtins(image).items() if name in shown}


async def test_a_deleted_events_exchange_is_declared_again_and_no_channel_stays_closed(settings):
    """ams.events deleted under a running publisher (an operator, a definitions reset): the next event, whose
    publish RabbitMQ answers NOT_FOUND by closing its channel, is published all the same (the exchange declared
    again on a new channel), and job publishing is not taken down with it. A channel RabbitMQ closes on an error
    while the connection stays up is replaced: the publisher does not say "disconnected" for good."""
    connection = await connect(settings.amqp_url)
    admin = await aio_pika.connect(settings.amqp_url)
    try:
        publisher = await Publisher.open(connection)
        await (await admin.channel()).exchange_delete(EVENTS_EXCHANGE)

        event_id = str(uuid.uuid4())
        await publisher.announce(
            routing_key="image.generate.succeeded", body=b"{}", message_id=event_id, message_type=JOB_FINISHED
        )
        assert publisher.state() == "ok"
        channel = await admin.channel()
        subscriber = await channel.declare_queue(exclusive=True)
        await subscriber.bind(await channel.get_exchange(EVENTS_EXCHANGE, ensure=True), routing_key="#")
        await publisher.announce(
            routing_key="image.generate.succeeded", body=b"{}", message_id=event_id, message_type=JOB_FINISHED
        )
        assert (await _next_event(subscriber, timeout=5)).message_id == event_id

        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):  # closes the job publishing channel
            await publisher.channel.declare_exchange(JOBS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        await wait_until(lambda: publisher.state() == "ok", timeout=10)
        await publisher.channel.get_exchange(JOBS_EXCHANGE, ensure=True)

        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):  # closes the reply channel
            await publisher.reply_channel.declare_exchange(JOBS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        replies = await channel.declare_queue(exclusive=True)
        await publisher.reply(replies.name, "the-correlation-id", b"done", "text/plain")
        reply = await next_reply(replies, 5)
        assert reply is not None and reply.correlation_id == "the-correlation-id"
    finally:
        await admin.close()
        await connection.close()
