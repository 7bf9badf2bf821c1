"""A message that kills processors is dead-lettered after MAX_INTERRUPTED_RUNS instead of stopping them for ever
(processor/interrupted_runs.py): real RabbitMQ redeliveries, tiny models, and real kill -9s of a processor."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika

from contract.jobs import JobStore, iso_stamp
from contract.messages import IMAGE_GENERATE
from infra.settings import Settings
from infra.storage import ObjectStore, StoredObject, open_store
from infra.storage.local import LocalStore
from processor import service
from processor.interrupted_runs import InterruptedRuns, runs_key
from processor.liveness import heartbeat_key
from processor.runtime import Runtime
from processor.service import build_consumer
from tests.support.amqp import drain, publish, wait_until
from tests.support.backdate import written_days_ago
from tests.support.server import running_server
from tests.test_processor import _start_processor, vhost_of

BODY = {"prompt": "a message that stops processors", "width": 64, "height": 64, "steps": 2, "seed": 3}


async def test_runs_are_counted_until_the_limit(tmp_path):
    runs = InterruptedRuns(LocalStore(tmp_path / "store"), limit=3)
    assert [await runs.start("m-1"), await runs.start("m-1")] == [1, 2]
    stored = json.loads((await runs._store.get(runs_key("m-1"))).data)
    assert (stored["message_id"], stored["runs"]) == ("m-1", 2)
    assert await runs.start("m-1") == 3  # not to run: nothing written
    assert json.loads((await runs._store.get(runs_key("m-1"))).data)["runs"] == 2
    await runs.clear("m-1")
    assert not await runs._store.exists(runs_key("m-1"))
    await runs._store.put(runs_key("m-2"), b"{half a wr", "application/json")
    assert await runs.start("m-2") == 1  # a count that cannot be read counts as none


async def _returned(amqp_url: str, queue: str, count: int) -> None:
    """Take the first `count` messages of `queue` and hand them back unacknowledged, as a processor that dies does:
    RabbitMQ delivers them again, marked redelivered."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue)
        for _ in range(count):
            message = await source.get(no_ack=False, timeout=10)
            assert message is not None and not message.redelivered


async def test_a_suspect_at_the_limit_is_dead_lettered_unrun_and_one_below_it_runs(make_settings, rabbit):
    settings = make_settings(IMAGE_ENABLED="1", IMAGE_SEARCH_ENABLED="0", PROCESSOR_CAPABILITIES="image")
    runtime = await Runtime.open(settings)
    try:
        runs = InterruptedRuns(runtime.store, settings.max_interrupted_runs)
        jobs = JobStore(runtime.store, 7)
        stopping = await publish(settings.amqp_url, IMAGE_GENERATE, BODY)
        survivor = await publish(settings.amqp_url, IMAGE_GENERATE, {**BODY, "seed": 4})
        await _returned(settings.amqp_url, "ams.image", 2)
        for _ in range(settings.max_interrupted_runs - 1):  # the runs of it that earlier processors did not survive
            await runs.start(stopping)
        consumer = build_consumer(runtime)
        await consumer.start()
        try:
            await wait_until(lambda: rabbit.queue_counts(vhost_of(settings))["ams.dead"][0] == 1)
            await wait_until(lambda: _status_is(jobs, survivor, "succeeded"))
        finally:
            await consumer.stop()
        [dead] = await drain(settings.amqp_url, "ams.dead")
        assert (dead.message_id, dead.headers["x-ams-reason-code"]) == (stopping, "interrupted")
        assert "MAX_INTERRUPTED_RUNS=3" in dead.headers["x-ams-reason"]
        record = await jobs.get(stopping)
        assert record is not None and record.status == "failed" and record.error.code == "interrupted"
        assert not await runtime.store.exists(f"images/generated/{stopping}.png")
        assert await runtime.store.exists(f"images/generated/{survivor}.png")
        for message_id in (stopping, survivor):
            assert not await runtime.store.exists(runs_key(message_id))
    finally:
        await runtime.close()


async def _status_is(jobs: JobStore, job_id: str, status: str) -> bool:
    record = await jobs.get(job_id)
    return record is not None and record.status == status


async def test_a_message_whose_processor_is_killed_each_time_is_dead_lettered_at_the_limit(make_env, rabbit, tmp_path):
    """kill -9 the processor while it runs a long generation, twice (MAX_INTERRUPTED_RUNS=2): the third processor
    dead-letters the message as `interrupted` without running it, and runs the message queued behind it."""
    env = make_env(
        IMAGE_ENABLED="1",
        IMAGE_SEARCH_ENABLED="0",
        PROCESSOR_CAPABILITIES="image",
        LOG_FORMAT="json",
        LOG_LEVEL="info",
        MAX_INTERRUPTED_RUNS="2",
        IMAGE_MAX_PIXEL_STEPS=str(256 * 256 * 60),
    )
    vhost = env["VHOST"]
    log_path = tmp_path / "processor.log"
    first = _start_processor(env, log_path)
    await wait_until(lambda: "consumer_started" in log_path.read_text(), timeout=90)
    stopping = await publish(env["AMQP_URL"], IMAGE_GENERATE, {**BODY, "width": 256, "height": 256, "steps": 60})
    await wait_until(lambda: rabbit.queue_counts(vhost)["ams.image"] == (0, 1), timeout=90)
    first.kill()
    first.wait()
    second = _start_processor(env, log_path)
    await wait_until(lambda: "delivered_again_after_interruption" in log_path.read_text(), timeout=90)
    second.kill()  # its run was counted before it started, and a 60-step generation is still running
    second.wait()
    survivor = await publish(env["AMQP_URL"], IMAGE_GENERATE, BODY)
    third = _start_processor(env, log_path)
    try:
        # the message is dead-lettered once the third processor finds the second dead, after a deferral
        await wait_until(lambda: rabbit.queue_counts(vhost)["ams.dead"][0] == 1, timeout=90)
        await wait_until(lambda: rabbit.queue_counts(vhost)["ams.image"] == (0, 0), timeout=90)
    finally:
        third.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(third.wait, 30) == 0
    [dead] = await drain(env["AMQP_URL"], "ams.dead")
    assert (dead.message_id, dead.headers["x-ams-reason-code"]) == (stopping, "interrupted")
    counts = [json.loads(line).get("interrupted_runs") for line in log_path.read_text().splitlines() if line.strip()]
    assert [count for count in counts if count is not None] == [1, 2]
    store = await open_store(Settings.from_env(env))
    try:
        jobs = JobStore(store, 7)
        assert (await jobs.get(stopping)).error.code == "interrupted"
        assert (await jobs.get(survivor)).status == "succeeded"
        assert not await store.exists(f"images/generated/{stopping}.png")
        assert not await store.exists(runs_key(stopping))
    finally:
        await store.close()


async def _left_behind(store: ObjectStore, root: Path, message_id: str, days: float) -> None:
    """A first delivery's -1 in the embedded store at `root`, written `days` ago (by its content and by the store's
    listing)."""
    at = iso_stamp(datetime.now(tz=UTC) - timedelta(days=days))
    body = json.dumps({"message_id": message_id, "runs": -1, "at": at}).encode()
    await store.put(runs_key(message_id), body, "application/json")
    written_days_ago(root, runs_key(message_id), days)


async def test_counts_left_behind_are_swept_once_past_the_job_record_ttl(tmp_path, monkeypatch):
    """A count can be left behind (a first delivery's -1 taken back after another delivery's ack removed the count, a
    removal the store did not take): the sweep deletes one last written longer ago than it keeps job records, not a
    fresher one, nor one written again between the listing and the sweep's read of it (its content stamped then)."""
    store = LocalStore(tmp_path / "store")
    runs = InterruptedRuns(store, limit=3)
    for message_id in ("left", "written-again"):
        await _left_behind(store, tmp_path / "store", message_id, 8)
    await runs.finished("fresh", first=True)
    await store.put(runs_key("earlier-form"), b'{"message_id": "earlier-form", "runs": 1}', "application/json")
    written_days_ago(tmp_path / "store", runs_key("earlier-form"), 8)
    read, rewrites = store.get, [runs_key("written-again")]

    async def read_as_written_again(key: str, **kwargs: object) -> StoredObject:
        if key in rewrites:
            rewrites.remove(key)
            await runs.start("written-again")
        return await read(key, **kwargs)

    monkeypatch.setattr(store, "get", read_as_written_again)
    assert await runs.sweep(timedelta(days=7)) == 2
    assert not await store.exists(runs_key("left"))
    assert not await store.exists(runs_key("earlier-form"))
    assert await store.exists(runs_key("fresh"))
    assert json.loads((await read(runs_key("written-again"))).data)["runs"] == 0


async def test_a_processor_sweeps_the_counts_left_behind(make_env, monkeypatch):
    """And the heartbeats of processors gone for over a day (processor/liveness.py), not a fresh one."""
    monkeypatch.setattr(service, "SWEEP_FIRST_AFTER_SECONDS", 0.5)
    env = make_env(JOB_RECORD_TTL_DAYS="7")
    settings = Settings.from_env(env)
    written = LocalStore(settings.local_storage_dir)  # before the processor starts: its first sweep comes at once
    await _left_behind(written, settings.local_storage_dir, "left-behind", 8)
    for processor, days in (("gone", 2.0), ("fresh", 0.5)):
        body = b'{"processor": "%s"}' % processor.encode()
        await written.put(heartbeat_key(processor), body, "application/json")
        written_days_ago(settings.local_storage_dir, heartbeat_key(processor), days)
    async with running_server(settings) as server:
        store = server.services.store

        async def swept() -> bool:
            return not await store.exists(runs_key("left-behind")) and not await store.exists(heartbeat_key("gone"))

        await wait_until(swept, timeout=30)
        assert await store.exists(heartbeat_key("fresh"))
