"""A message that kills processors is dead-lettered after MAX_INTERRUPTED_RUNS instead of stopping them for ever
(processor/interrupted_runs.py): real RabbitMQ redeliveries, tiny models, and real kill -9s of a processor."""

from __future__ import annotations

import asyncio
import json
import signal

import aio_pika

from contract.jobs import JobStore
from contract.messages import IMAGE_GENERATE
from infra.settings import Settings
from infra.storage import open_store
from infra.storage.local import LocalStore
from processor.interrupted_runs import InterruptedRuns, runs_key
from processor.runtime import Runtime
from processor.service import build_consumer
from tests.support.amqp import drain, publish, wait_until
from tests.test_processor import _start_processor, vhost_of

BODY = {"prompt": "a message that stops processors", "width": 64, "height": 64, "steps": 2, "seed": 3}


async def test_runs_are_counted_until_the_limit(tmp_path):
    runs = InterruptedRuns(LocalStore(tmp_path / "store"), limit=3)
    assert [await runs.start("m-1"), await runs.start("m-1")] == [1, 2]
    stored = await runs._store.get(runs_key("m-1"))
    assert json.loads(stored.data) == {"message_id": "m-1", "runs": 2}
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
