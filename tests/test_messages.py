"""The queue as a public interface: the documented examples, JSON Schemas, bucket events, metrics."""

from __future__ import annotations

import base64
import json
import re
import uuid
from pathlib import Path

import httpx
import jsonschema
import pytest

from contract.callbacks import JOB_CALLBACK
from contract.events import JOB_FINISHED
from contract.image_ids import image_id_for_key
from contract.messages import (
    END,
    IMAGE_DELETE,
    IMAGE_EMBED,
    IMAGE_GENERATE,
    IMAGE_INDEX,
    VOICE_GENERATE,
    ContractError,
    decode_job,
)
from contract.schemas import schema_files, stale_files
from tests.support.amqp import drain, next_reply, publish, publish_many, wait_until
from tests.support.audio import speech_clip
from tests.support.images import encoded
from tests.support.server import running_server

DOC = Path(__file__).resolve().parent.parent / "docs" / "messages.md"
_EXAMPLE = re.compile(r"```json ([a-z.]+)\n(.*?)```", re.DOTALL)


def documented_examples() -> list[tuple[str, dict]]:
    return [(kind, json.loads(body)) for kind, body in _EXAMPLE.findall(DOC.read_text())]


def test_committed_schemas_match_the_structs():
    assert stale_files() == [], "run: python -m contract.schemas"
    assert set(schema_files()) == {
        f"{kind}.v1.json"
        for kind in (IMAGE_INDEX, IMAGE_GENERATE, VOICE_GENERATE, IMAGE_DELETE, IMAGE_EMBED, JOB_CALLBACK, JOB_FINISHED)
    }


def test_every_job_type_has_a_documented_example():
    kinds = {kind for kind, _ in documented_examples()}
    assert kinds == {IMAGE_INDEX, IMAGE_GENERATE, VOICE_GENERATE, IMAGE_DELETE, "bucket.event"}


_IMAGE_ID = "0d8f0b8e-5b5e-4a4e-9a43-2c6f8e1c7b21"
_KEY = "images/incoming/a.png"


def _patterns(schema: object) -> list[str]:
    """Every `pattern` anywhere in a JSON Schema."""
    if isinstance(schema, dict):
        found = [schema["pattern"]] if isinstance(schema.get("pattern"), str) else []
        return found + [pattern for value in schema.values() for pattern in _patterns(value)]
    if isinstance(schema, list):
        return [pattern for value in schema for pattern in _patterns(value)]
    return []


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (IMAGE_INDEX, {"image_id": _IMAGE_ID + "\n", "key": _KEY}),
        (IMAGE_INDEX, {"key": _KEY, "source": "crm-sync\n"}),
        (IMAGE_DELETE, {"image_id": _IMAGE_ID + "\n"}),
    ],
)
def test_a_value_with_a_trailing_newline_is_a_schema_violation(kind, body):
    """msgspec checks a `pattern` with Python's re.search, whose `$` also matches before a final newline: a UUID or a
    source followed by "\n" must break the contract (and its committed JSON Schema) all the same."""
    schema = jsonschema.Draft202012Validator(json.loads(schema_files()[f"{kind}.v1.json"]))
    with pytest.raises(ContractError) as refused:
        decode_job(kind, "application/json", json.dumps(body).encode())
    assert refused.value.code == "schema_violation"
    assert not schema.is_valid(body)
    trimmed = {name: value.rstrip("\n") for name, value in body.items()}
    decode_job(kind, "application/json", json.dumps(trimmed).encode())
    assert schema.is_valid(trimmed)


def test_every_pattern_of_the_contract_that_ends_the_text_ends_it_in_python_too():
    """A pattern anchored with a bare `$` takes a trailing newline in Python (msgspec, jsonschema), not in
    JSON Schema's ECMAScript: each one the Structs have ends with END, which both read as the end of the text."""
    patterns = [pattern for text in schema_files().values() for pattern in _patterns(json.loads(text))]
    anchored = [pattern for pattern in patterns if pattern.endswith("$")]
    assert anchored, patterns
    for pattern in anchored:
        assert pattern.endswith(END), pattern


@pytest.fixture(scope="module")
async def server(make_settings, s3):
    bucket = s3.new_bucket()
    settings = make_settings(r2_bucket=bucket, endpoint=s3.endpoint, IMAGE_ENABLED="1", VOICE_ENABLED="1")
    async with running_server(settings) as running:
        running.bucket = bucket
        yield running


def put(s3, bucket: str, key: str, data: bytes, content_type: str = "image/png") -> None:
    s3.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)


def point_exists(server, image_id: str):
    async def check() -> bool:
        return await server.services.index.get(image_id) is not None

    return check


async def job_finished(server, job_id: str) -> dict:
    job: dict = {}

    async def finished() -> bool:
        nonlocal job
        job = (await server.client.get(f"/v1/jobs/{job_id}")).json()
        return job.get("status") in ("succeeded", "failed")

    try:
        await wait_until(finished, timeout=60)
    except AssertionError:
        raise AssertionError(f"job {job_id} did not finish: {job}") from None
    return job


async def test_each_documented_example_is_processed(server, s3):
    """Publish every example of docs/messages.md as it stands, with a plain aio-pika client."""
    url, bucket, index = server.services.settings.amqp_url, server.bucket, server.services.index
    jobs = [(kind, body) for kind, body in documented_examples() if kind != "bucket.event"]
    for kind, body in jobs:
        message_id = str(uuid.uuid4())
        if kind == IMAGE_INDEX and "key" in body:
            put(s3, bucket, body["key"], encoded(5, "PNG"))
            await publish(url, kind, body, message_id=message_id)
            await wait_until(point_exists(server, image_id_for_key(bucket, body["key"])))
            assert (await index.get(image_id_for_key(bucket, body["key"]))).r2_key == body["key"]
        elif kind == IMAGE_INDEX:
            await publish(url, kind, body, message_id=message_id)
            await wait_until(point_exists(server, body["image_id"]))
            record = await index.get(body["image_id"])
            assert (record.filename, record.source) == (body["filename"], body["source"])
        elif kind == IMAGE_GENERATE:
            await publish(url, kind, body, message_id=message_id)
            job = await job_finished(server, message_id)
            assert job["status"] == "succeeded", job
            settings = server.services.settings
            size = (settings.image_default_width, settings.image_default_height)
            assert (job["result"]["width"], job["result"]["height"], job["result"]["seed"]) == (*size, 42)
            assert f"images/generated/{message_id}.png" in s3.keys(bucket, "images/generated/")
        elif kind == VOICE_GENERATE:
            put(s3, bucket, body["ref_audio_key"], speech_clip("wav"), "audio/wav")
            await publish(url, kind, body, message_id=message_id)
            job = await job_finished(server, message_id)
            assert job["status"] == "succeeded", job
            assert f"voice/generated/{message_id}.mp3" in s3.keys(bucket, "voice/generated/")
        elif kind == IMAGE_DELETE:
            original = (await index.get(body["image_id"])).r2_key
            await publish(url, kind, body, message_id=message_id)
            await wait_until(lambda image_id=body["image_id"]: _gone(server, image_id))
            assert original not in s3.keys(bucket, "images/")
        else:
            raise AssertionError(f"no check for documented type {kind}")
    assert {kind for kind, _ in jobs} == {IMAGE_INDEX, IMAGE_GENERATE, VOICE_GENERATE, IMAGE_DELETE}
    assert await _dead_letters(server) == []


async def _gone(server, image_id: str) -> bool:
    return await server.services.index.get(image_id) is None


async def _dead_letters(server) -> list:
    return await drain(server.services.settings.amqp_url, "ams.dead", timeout=0.3)


async def publish_event(server, event: dict, *, bucket: str | None = None) -> None:
    await publish_events(server, [event], bucket=bucket)


async def publish_events(server, events: list[dict], *, bucket: str | None = None) -> None:
    """As MinIO does: routing key bucket.event, no `type`, no `message_id`; one message per event, in order."""
    url = server.services.settings.amqp_url
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("ams.jobs")
        for event in events:
            body = json.dumps(event).replace("my-bucket", bucket or server.bucket).encode()
            message = aio_pika.Message(
                body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await exchange.publish(message, routing_key="bucket.event")


def r2_event(action: str, key: str, size: int | None = 86) -> dict:
    event = {
        "account": "3f4b7e3dcab231cbfdaa90a6a28bd548",
        "action": action,
        "bucket": "my-bucket",
        "object": {"key": key} if size is None else {"key": key, "size": size, "eTag": "c846ff7a"},
        "eventTime": "2026-11-25T10:31:02.379Z",
    }
    return event


def s3_event(name: str, key: str) -> dict:
    encoded_key = key.replace("/", "%2F").replace(" ", "+")
    return {
        "Records": [
            {
                "eventName": name,
                "eventTime": "2026-11-25T10:35:12.000Z",
                "s3": {"bucket": {"name": "my-bucket"}, "object": {"key": encoded_key, "size": 100}},
            }
        ]
    }


async def wait_for_idle(server) -> None:
    """Until the jobs queue is empty and nothing is in flight."""
    rabbit_url = server.services.settings.amqp_url
    import aio_pika

    async def idle() -> bool:
        connection = await aio_pika.connect(rabbit_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("ams.index", passive=True)
            return queue.declaration_result.message_count == 0 and server.processor.consumer.idle

    await wait_until(idle, timeout=30, interval=0.1)


@pytest.mark.parametrize("event_format", ["r2", "s3"])
async def test_bucket_events_index_in_place_and_remove(server, s3, event_format):
    key = f"images/incoming/{event_format} photo {uuid.uuid4().hex[:6]}.png"
    image = encoded(5000 + uuid.uuid4().int % 100_000, "PNG")  # a drawing no other test of this server makes
    put(s3, server.bucket, key, image)
    created = r2_event("PutObject", key) if event_format == "r2" else s3_event("ObjectCreated:Put", key)
    removed = r2_event("DeleteObject", key, None) if event_format == "r2" else s3_event("s3:ObjectRemoved:Delete", key)
    image_id = image_id_for_key(server.bucket, key)
    index = server.services.index
    before = await index.count()
    originals = set(s3.keys(server.bucket, "images/originals/"))

    await publish_event(server, created)
    await wait_until(point_exists(server, image_id))
    record = await index.get(image_id)
    assert (record.r2_key, record.source) == (key, "bucket-event")
    assert set(s3.keys(server.bucket, "images/originals/")) == originals  # indexed in place, not copied
    found = await server.client.post(
        "/v1/images/search/by-image", files={"file": ("q.png", image, "image/png")}, params={"limit": 5}
    )
    # the tiny model's 32-dim vectors can tie for first place; the image itself is among the exact matches
    exact = [hit["id"] for hit in found.json()["results"] if hit["score"] > 0.9999]
    assert image_id in exact

    await publish_event(server, created)  # the same event again: still one point
    await wait_for_idle(server)
    assert await index.count() == before + 1

    s3.client.delete_object(Bucket=server.bucket, Key=key)
    await publish_event(server, removed)
    await wait_until(lambda: _gone(server, image_id))
    assert await index.count() == before
    assert await _dead_letters(server) == []


@pytest.mark.parametrize(
    ("event", "put_first"),
    [
        (r2_event("PutObject", "documents/report.png"), True),  # outside WATCH_PREFIXES
        (r2_event("PutObject", "images/incoming/notes.png"), False),  # object already gone
        (r2_event("CreateMultipartUpload", "images/incoming/x.png"), False),  # neither create nor delete
        (s3_event("ObjectCreated:Put", "images/incoming/manual.pdf"), True),  # not an image
        (s3_event("ObjectRestore:Completed", "images/incoming/y.png"), False),
        (r2_event("PutObject", "images/incoming/scans\\page1.png"), True),  # a key with a backslash
        (r2_event("PutObject", "images/incoming/../incoming/z.png"), True),  # a '..' segment
    ],
)
async def test_events_that_are_not_for_us_are_skipped(server, s3, event, put_first):
    key = (
        event["object"]["key"] if "object" in event else event["Records"][0]["s3"]["object"]["key"].replace("%2F", "/")
    )
    if put_first:
        body = b"%PDF-1.7 a manual" if key.endswith(".pdf") else encoded(7, "PNG")
        put(s3, server.bucket, key, body)
    before = await server.services.index.count()
    await publish_event(server, event)
    await wait_for_idle(server)
    assert await server.services.index.count() == before
    assert await _dead_letters(server) == []


async def test_events_for_another_bucket_are_skipped(server, s3):
    key = f"images/incoming/{uuid.uuid4().hex}.png"
    put(s3, server.bucket, key, encoded(8, "PNG"))
    before = await server.services.index.count()
    await publish_event(server, r2_event("PutObject", key), bucket="someone-elses-bucket")
    await wait_for_idle(server)
    assert await server.services.index.count() == before


async def test_a_malformed_event_is_dead_lettered_with_its_reason(server):
    await publish_event(server, {"hello": "world"})
    await wait_until(lambda: _dead_count(server, 1), timeout=10)
    [dead] = await _dead_letters(server)
    assert dead.headers["x-ams-reason-code"] == "unknown_event_format"
    assert dead.headers["x-ams-routing-key"] == "bucket.event"
    assert dead.type == "bucket.event"
    uuid.UUID(dead.message_id)


async def test_a_uuid_with_a_trailing_newline_is_dead_lettered_alone(server):
    """An image.index whose image_id ends in "\\n", published with a backlog of good ones (so batched with them): it
    alone is dead-lettered, as a schema_violation, and the good ones are indexed."""
    await _dead_letters(server)
    data = base64.b64encode(encoded(4100, "PNG")).decode()
    bad_id = str(uuid.uuid4())
    bodies: list[dict] = [{"data": data} for _ in range(12)]
    bodies.insert(6, {"image_id": bad_id + "\n", "data": data})
    ids = await publish_many(server.services.settings.amqp_url, IMAGE_INDEX, bodies)
    good = ids[:6] + ids[7:]

    async def all_indexed() -> bool:
        return len(await server.services.index.get_many(good)) == len(good)

    await wait_until(lambda: _dead_count(server, 1), timeout=30)
    await wait_until(all_indexed, timeout=30)
    [dead] = await _dead_letters(server)
    assert (dead.message_id, dead.headers["x-ams-reason-code"]) == (ids[6], "schema_violation")
    assert "image_id" in dead.headers["x-ams-reason"]
    assert await server.services.index.get(bad_id) is None


async def _dead_count(server, count: int) -> bool:
    import aio_pika

    connection = await aio_pika.connect(server.services.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("ams.dead", passive=True)
        return queue.declaration_result.message_count == count


async def test_a_json_request_gets_a_json_reply(server):
    import aio_pika

    connection = await aio_pika.connect(server.services.settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(exclusive=True)
        exchange = await channel.get_exchange("ams.jobs")
        await exchange.publish(
            aio_pika.Message(
                json.dumps({"prompt": "reply to me", "seed": 3}).encode(),
                content_type="application/json",
                type=IMAGE_GENERATE,
                message_id=str(uuid.uuid4()),
                reply_to=replies.name,
                correlation_id="c-1",
            ),
            routing_key=IMAGE_GENERATE,
        )
        reply = await next_reply(replies, timeout=30)
    assert reply is not None and reply.correlation_id == "c-1"
    assert reply.content_type == "application/json"
    body = json.loads(reply.body)
    assert body["status"] == "succeeded"
    assert body["result"]["seed"] == 3


async def test_metrics(server):
    queued = await server.client.post("/v1/jobs", json={"type": "image.generate", "params": {"prompt": "count me"}})
    await job_finished(server, queued.json()["job_id"])
    await publish(server.services.settings.amqp_url, IMAGE_INDEX, b"{not json")
    await wait_until(lambda: _dead_count(server, 1), timeout=10)
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        text = (await client.get("/metrics")).text
    assert 'ams_queue_messages{queue="ams.dead"} 1.0' in text
    assert 'ams_queue_messages{queue="ams.index"}' in text
    for queue in ("ams.index", "ams.image"):
        assert f'ams_queue_consumers{{queue="{queue}"}} 1.0' in text
    assert re.search(r'ams_jobs_total\{outcome="dead_lettered",type="image.index"\} [1-9]', text)
    assert re.search(r'ams_jobs_total\{outcome="succeeded",type="image.generate"\} [1-9]', text)
    assert re.search(r'ams_job_duration_seconds_count\{outcome="succeeded",type="image.generate"\} [1-9]', text)
    await _dead_letters(server)


async def test_bucket_events_are_embedded_in_batches(server, s3):
    """100 objects, one event each, as a backfill of a bucket would send them: a few forward passes, not 100."""
    keys = [f"images/incoming/batch-{uuid.uuid4().hex[:8]}-{n}.png" for n in range(100)]
    for n, key in enumerate(keys):
        put(s3, server.bucket, key, encoded(2000 + n, "PNG"))
    embedder = server.processor.runtime.clip
    real_embed = embedder.embed_prepared
    forward_passes: list[int] = []

    def spy(inputs):
        forward_passes.append(len(inputs))
        return real_embed(inputs)

    embedder.embed_prepared = spy
    try:
        await publish_events(server, [r2_event("PutObject", key) for key in keys])

        async def all_indexed() -> bool:
            found = await server.services.index.get_many([image_id_for_key(server.bucket, key) for key in keys])
            return len(found) == len(keys)

        await wait_until(all_indexed, timeout=90, interval=0.2)
    finally:
        del embedder.embed_prepared
    batch_size = server.services.settings.image_search_batch_size
    assert sum(forward_passes) == 100
    assert max(forward_passes) == batch_size
    assert len(forward_passes) <= 2 * 100 // batch_size, forward_passes
    assert await _dead_letters(server) == []


async def test_bucket_events_keep_their_order_around_removals(server, s3):
    """Creates, then removals of some of those keys, then creates of some removed ones again, one message each and
    all at once: batches run side by side, yet the index ends as the events say."""
    tag = uuid.uuid4().hex[:8]
    keys = [f"images/incoming/order-{tag}-{n}.png" for n in range(40)]
    for n, key in enumerate(keys):
        put(s3, server.bucket, key, encoded(3000 + n, "PNG"))
    removed, again = keys[:12], keys[:5]
    again_events = [{**r2_event("PutObject", key), "eventTime": "2026-11-25T11:00:00.000Z"} for key in again]
    await publish_events(
        server,
        [r2_event("PutObject", key) for key in keys]
        + [r2_event("DeleteObject", key, None) for key in removed]
        + again_events,
    )
    await wait_for_idle(server)
    found = await server.services.index.get_many([image_id_for_key(server.bucket, key) for key in keys])
    present = {record.r2_key for record in found.values()}
    assert present == set(keys) - set(removed) | set(again)
    assert await _dead_letters(server) == []
