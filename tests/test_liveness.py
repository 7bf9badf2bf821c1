"""Heartbeats on a store that refuses them for good (a token scoped to other prefixes, a bucket policy): the
heartbeat keeps beating and says so, a look that cannot read one finds no living run, as before processors had
heartbeats, and a redelivery whose record cannot be read is not deferred (processor/liveness.py). The looks
themselves: tests/test_connection_losses.py."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import structlog

from contract.messages import IMAGE_GENERATE
from infra.broker import DEFERRAL_HEADER
from infra.storage import StorageError, StorageUnavailableError
from infra.storage.local import LocalStore
from processor import liveness
from processor.deliveries import Deferral
from processor.runtime import Runtime
from processor.service import build_consumer
from processor.tracking import JobTracker
from tests.support.amqp import drain, publish, wait_until


@pytest.fixture
def store(tmp_path, monkeypatch) -> LocalStore:
    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 0.05)
    return LocalStore(tmp_path / "store")


async def test_a_refused_heartbeat_write_is_logged_and_the_heartbeat_beats_on(store, monkeypatch):
    put, refusals = store.put, []

    async def refusing_once(key: str, *args: object, **kwargs: object) -> str:
        if not refusals:
            refusals.append(key)
            raise StorageError("access denied to processor/alive/")
        return await put(key, *args, **kwargs)

    monkeypatch.setattr(store, "put", refusing_once)
    heartbeat = liveness.Heartbeat(store, "a1")
    heartbeat.start()
    try:
        with structlog.testing.capture_logs() as logs:
            heartbeat.running("a1.0")
            await wait_until(lambda: store.exists(liveness.heartbeat_key("a1")), timeout=5)
        assert refusals == [liveness.heartbeat_key("a1")]
        assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["heartbeat_not_written"]
    finally:
        await heartbeat.stop()


async def test_a_heartbeat_that_cannot_be_read_is_no_living_run(store, monkeypatch):
    there, here = liveness.Heartbeat(store, "a1"), liveness.Heartbeat(store, "b2")
    there.start()
    try:
        there.running("a1.0")
        await wait_until(lambda: store.exists(liveness.heartbeat_key("a1")), timeout=5)

        async def refused(key: str) -> object:
            raise StorageError("access denied to processor/alive/")

        monkeypatch.setattr(store, "get", refused)
        with structlog.testing.capture_logs() as logs:
            assert (await here.look(["a1.0"], {})).living == ()
        assert [entry["event"] for entry in logs] == ["heartbeat_not_read"]
    finally:
        monkeypatch.undo()
        await there.stop()


async def test_a_suspect_whose_record_read_is_refused_fails_as_before_and_is_not_handed_back_for_ever(
    make_settings, rabbit, monkeypatch
):
    """A deferred copy (a suspect) whose record the store refuses to read (not unavailable): its look is given up,
    and the run that reads the record fails the job as it always did (dead-lettered `internal_error`, replayable),
    rather than the delivery being handed back and coming again for ever."""

    async def refused(self: JobTracker, job: object, *, replayed: bool = False) -> object:
        raise StorageError("access denied to jobs/")

    monkeypatch.setattr(JobTracker, "load", refused)
    settings = make_settings(IMAGE_ENABLED="1", IMAGE_SEARCH_ENABLED="0", JOB_EVENTS_ENABLED="0")
    deferral = msgspec.json.encode(Deferral(attempt=1, seconds=5.0)).decode()
    runtime = await Runtime.open(settings)
    consumer = build_consumer(runtime)
    await consumer.start()
    try:
        with structlog.testing.capture_logs() as logs:
            message_id = await publish(
                settings.amqp_url,
                IMAGE_GENERATE,
                {"prompt": "refused", "width": 64, "height": 64, "steps": 1},
                headers={DEFERRAL_HEADER: deferral},
            )
            dead = await drain(settings.amqp_url, "ams.dead", 20.0)
        assert [(letter.message_id, letter.headers["x-ams-reason-code"]) for letter in dead] == [
            (message_id, "internal_error")
        ]
        assert "liveness_not_looked_at" in [entry["event"] for entry in logs]
    finally:
        await consumer.stop()
        await runtime.close()


async def test_a_heartbeat_the_store_does_not_answer_for_is_looked_at_again_not_taken_for_dead(store, monkeypatch):
    """A 503 or a timeout on one heartbeat read: that run cannot be told dead this round, so the redelivery waits
    another round, comparing then with the version seen before."""
    there, here = liveness.Heartbeat(store, "a1"), liveness.Heartbeat(store, "b2")
    there.start()
    try:
        there.running("a1.0")
        there.running("a1.1")  # runs on: the heartbeat goes on being written
        await wait_until(lambda: store.exists(liveness.heartbeat_key("a1")), timeout=5)
        first = await here.look(["a1.0"], {})
        get = store.get

        async def not_answering(key: str) -> object:
            raise StorageUnavailableError("SlowDown")

        monkeypatch.setattr(store, "get", not_answering)
        with structlog.testing.capture_logs() as logs:
            unread = await here.look(["a1.0"], first.seen)
        assert (unread.living, unread.seen) == (("a1",), first.seen)
        assert [entry["event"] for entry in logs] == ["heartbeat_not_read"]
        monkeypatch.setattr(store, "get", get)
        there.ended(["a1.0"])
        await asyncio.sleep(0.2)
        assert (await here.look(["a1.0"], unread.seen)).living == ()  # changed since, and no longer listing it
    finally:
        await there.stop()


async def test_a_refused_heartbeat_delete_does_not_stop_the_stop(store, monkeypatch):
    heartbeat = liveness.Heartbeat(store, "a1")
    heartbeat.start()
    heartbeat.running("a1.0")
    await wait_until(lambda: store.exists(liveness.heartbeat_key("a1")), timeout=5)

    async def refused(key: str, **kwargs: object) -> bool:
        raise StorageError("access denied to processor/alive/")

    monkeypatch.setattr(store, "delete", refused)
    with structlog.testing.capture_logs() as logs:
        await heartbeat.stop()
    assert [entry["event"] for entry in logs] == ["heartbeat_not_deleted"]
