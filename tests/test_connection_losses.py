"""A processor that loses its connection to RabbitMQ (closed by the broker here, as a broker restart closes it) lives
on and finishes the run it had; only its acknowledgement is lost, and the message comes again marked redelivered.
Such a run was not interrupted (processor/interrupted_runs.py): a job run across MAX_INTERRUPTED_RUNS lost
connections is not dead-lettered as `interrupted`. The slow jobs: a callback to a receiver on loopback that holds
each POST until the test lets it go (an untracked job, which runs again), and a generation whose model call the test
holds (a tracked job, whose redelivery waits for the living run: processor/liveness.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import pytest

from contract.callback_states import read_state
from contract.callbacks import JOB_CALLBACK, JobCallbackV1
from contract.events import job_finished
from contract.jobs import JobStore
from contract.messages import IMAGE_GENERATE
from contract.metrics import REGISTRY
from infra.settings import Settings
from infra.storage.local import LocalStore
from processor import liveness
from processor.consumer import Consumer
from processor.interrupted_runs import InterruptedRuns, runs_key
from processor.runtime import Runtime
from processor.service import build_consumer
from tests.support.amqp import drain, publish, wait_until
from tests.support.rabbitmq import RabbitNode

QUEUE = "ams.callback"
DEFERRED = {"type": IMAGE_GENERATE, "outcome": "deferred"}


class HeldReceiver:
    """A webhook receiver that answers each POST 200 once the test releases it (by its number, from 0)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._releases: list[threading.Event] = []
        self.received = 0

    def arrived(self) -> threading.Event:
        """Count a POST that came in; the event that releases it."""
        with self._lock:
            self.received += 1
            return self._release(self.received - 1)

    def _release(self, number: int) -> threading.Event:
        while len(self._releases) <= number:
            self._releases.append(threading.Event())
        return self._releases[number]

    def release(self, *numbers: int) -> None:
        with self._lock:
            for number in numbers:
                self._release(number).set()


@pytest.fixture
def receiver() -> Iterator[tuple[HeldReceiver, str]]:
    state = HeldReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            state.arrived().wait(60)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"127.0.0.1:{server.server_address[1]}"
    finally:
        state.release(*range(16))
        server.shutdown()
        server.server_close()


@contextlib.asynccontextmanager
async def processor(settings: Settings) -> AsyncIterator[tuple[Runtime, Consumer]]:
    runtime = await Runtime.open(settings)
    consumer = build_consumer(runtime)
    await consumer.start()
    try:
        yield runtime, consumer
    finally:
        await consumer.stop()
        await runtime.close()


def _holder(rabbit: RabbitNode, vhost: str) -> str | None:
    """The connection whose channel holds the (one) unacknowledged message, if any."""
    out = rabbit.ctl("list_channels", "-p", vhost, "connection", "messages_unacknowledged").stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) > 0:
            return parts[0]
    return None


def _consumers(rabbit: RabbitNode, vhost: str, queue: str = QUEUE) -> int:
    out = rabbit.ctl("list_consumers", "-p", vhost, "queue_name").stdout
    return sum(1 for line in out.splitlines() if line.strip() == queue)


async def _lose_connection(rabbit: RabbitNode, vhost: str, lost: set[str]) -> None:
    """Close the connection of the processor running the message, as a broker restart would: RabbitMQ delivers the
    message again, marked redelivered, to the other processor, which takes it (that one's connection is up)."""
    holder = _holder(rabbit, vhost)
    assert holder is not None
    rabbit.ctl("close_connection", holder, "test: connection lost")
    lost.add(holder)
    await wait_until(lambda: (_holder(rabbit, vhost) or holder) not in lost, timeout=30)


async def test_a_job_run_across_lost_connections_is_not_dead_lettered_as_interrupted(make_env, rabbit, receiver):
    """MAX_INTERRUPTED_RUNS=2, two processors. The first runs the callback; its connection is lost, and the other
    takes the message again (a suspect, counted) and runs it too; that one's connection is lost in turn, and the
    message comes back to the first, behind the run it still has. That run ends (its ack lost): it was not
    interrupted, so the third delivery runs instead of being dead-lettered, while the second is still running."""
    held, host = receiver
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    env = make_env(
        IMAGE_SEARCH_ENABLED="0",
        PROCESSOR_CAPABILITIES="callback",
        CALLBACK_HOSTS=host,
        CALLBACK_SECRET=secret,
        CALLBACK_TIMEOUT_SECONDS="60",
        CALLBACK_ALLOW_PRIVATE_ADDRESSES="1",
        JOB_EVENTS_ENABLED="0",
        MAX_INTERRUPTED_RUNS="2",
    )
    settings, vhost = Settings.from_env(env), env["VHOST"]
    url = f"http://{host}/hook"
    record = JobStore.new("job-across-lost-connections", IMAGE_GENERATE, {"prompt": "p"}, callback_url=url)
    record = msgspec.structs.replace(record, status="succeeded", finished_at=record.created_at, result={"key": "k"})
    _, event = job_finished(record)
    body = msgspec.json.encode(JobCallbackV1(url=url, event=event))
    lost: set[str] = set()
    async with processor(settings) as (runtime, first), processor(settings) as (_, second):
        await publish(settings.amqp_url, JOB_CALLBACK, body, message_id=event.event_id)
        await wait_until(lambda: held.received == 1)
        await _lose_connection(rabbit, vhost, lost)
        await wait_until(lambda: held.received == 2)  # the other processor runs it, as a suspect
        await wait_until(lambda: _consumers(rabbit, vhost) == 2, timeout=60)  # the first is back
        await _lose_connection(rabbit, vhost, lost)  # the third delivery waits behind the first's run
        held.release(0)  # the first run ends: its ack is lost with its connection
        await wait_until(lambda: held.received == 3 or rabbit.queue_counts(vhost)[QUEUE] == (0, 0))
        held.release(1, 2)
        await wait_until(lambda: rabbit.queue_counts(vhost)[QUEUE] == (0, 0))
        await wait_until(lambda: first.idle and second.idle)
        dead = [message for message in await drain(settings.amqp_url, "ams.dead", 1.0) if message.type == JOB_CALLBACK]
        assert [message.headers.get("x-ams-reason-code") for message in dead] == []
        assert held.received == 3
        state = await read_state(runtime.store, record.job_id)
        assert state is not None and state.state == "delivered"
        assert not await runtime.store.exists(runs_key(event.event_id))


class HeldModel:
    """Stands in front of each processor's image model: counts the generations asked of it, and holds each until
    the test releases them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.released = threading.Event()

    def hold(self, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
        generate = runtime.generator.generate

        def held(*args: object, **kwargs: object) -> bytes:
            with self._lock:
                self.calls += 1
            self.released.wait(60)
            return generate(*args, **kwargs)

        monkeypatch.setattr(runtime.generator, "generate", held)


def _deferred() -> float:
    return REGISTRY.get_sample_value("ams_jobs_total", DEFERRED) or 0


async def test_a_redelivery_while_the_run_lives_is_deferred_not_run_again(make_env, rabbit, monkeypatch):
    """MAX_INTERRUPTED_RUNS=2, two processors. The first runs a generation, held; its connection is lost, and the other
    takes the message again: the first run lives (its heartbeat goes on), so the redelivery is neither run nor counted
    but deferred, and deferred again when it comes back; nor does it run after every connection is lost once more (a
    broker restart). Once the held run ends the job has succeeded once: one model call, one image, nothing
    dead-lettered, no count of interrupted runs left."""
    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 0.2)  # five beats to a deferral (its delay queue: 1 s)
    env = make_env(
        IMAGE_ENABLED="1",
        IMAGE_SEARCH_ENABLED="0",
        PROCESSOR_CAPABILITIES="image",
        JOB_EVENTS_ENABLED="0",
        MAX_INTERRUPTED_RUNS="2",
    )
    settings, vhost = Settings.from_env(env), env["VHOST"]
    held = HeldModel()
    async with processor(settings) as (runtime, first), processor(settings) as (other, second):
        held.hold(runtime, monkeypatch)
        held.hold(other, monkeypatch)
        try:
            job = await _held_across_lost_connections(rabbit, vhost, runtime, held)
        finally:
            held.released.set()
        jobs = JobStore(runtime.store, 7)
        await wait_until(lambda: _status_is(jobs, job, "succeeded"))
        await wait_until(lambda: not any(sum(counts) for counts in rabbit.queue_counts(vhost).values()))
        await wait_until(lambda: first.idle and second.idle)
        assert held.calls == 1
        assert await drain(settings.amqp_url, "ams.dead", 1.0) == []
        record = await jobs.get(job)
        assert record is not None and (record.status, record.marks) == ("succeeded", [])
        assert await runtime.store.exists(f"images/generated/{job}.png")
        assert not await runtime.store.exists(runs_key(job))


async def _held_across_lost_connections(rabbit: RabbitNode, vhost: str, runtime: Runtime, held: HeldModel) -> str:
    """Publish a generation and lose the connection of the processor running it (held), then every connection; the
    job's id, once the redelivery is seen neither run again nor counted. rabbitmqctl runs in a thread: the
    processors share the test's event loop, and a loop held for a second would hold their heartbeats too."""

    def ctl(*args: str, check: bool = True) -> Awaitable[subprocess.CompletedProcess[str]]:
        return asyncio.to_thread(rabbit.ctl, *args, check=check)

    async def image_queue() -> tuple[int, int]:
        return (await asyncio.to_thread(rabbit.queue_counts, vhost))["ams.image"]

    async def unacknowledged() -> bool:
        return await image_queue() == (0, 1)

    async def both_consuming() -> bool:
        return await asyncio.to_thread(_consumers, rabbit, vhost, "ams.image") == 2

    before = _deferred()
    job = await publish(runtime.settings.amqp_url, IMAGE_GENERATE, {"prompt": "held", "width": 64, "height": 64})
    await wait_until(lambda: held.calls == 1)
    await wait_until(unacknowledged)
    holder = await asyncio.to_thread(_holder, rabbit, vhost)
    assert holder is not None
    await ctl("close_connection", holder, "test: connection lost")
    await wait_until(lambda: _deferred() - before >= 2 or held.calls > 1)  # looked at, then found alive
    assert held.calls == 1
    await wait_until(both_consuming, timeout=60)
    deferred = _deferred()
    for connection in (await ctl("list_connections", "-p", vhost, "pid")).stdout.split():
        await ctl("close_connection", connection, "test: broker restart", check=False)
    await wait_until(both_consuming, timeout=60)

    async def deferred_again() -> bool:  # or waiting behind the first's own run once it took it back
        return _deferred() > deferred or held.calls > 1 or await unacknowledged()

    await wait_until(deferred_again)
    assert held.calls == 1
    assert not await runtime.store.exists(runs_key(job))  # nothing counted
    return job


async def _status_is(jobs: JobStore, job_id: str, status: str) -> bool:
    record = await jobs.get(job_id)
    return record is not None and record.status == status


async def test_a_run_lives_while_its_heartbeat_changes_and_lists_its_mark(tmp_path, monkeypatch):
    """The looks a suspect makes (processor/liveness.py): the first at a processor cannot tell; a heartbeat changed
    since and listing the mark lives; one no longer listing it, unchanged, or missing does not. A mark of the looking
    processor lives while its run is in hand there, with nothing read; a bare uuid (a mark of the earlier form) names
    no processor."""
    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 0.05)
    store = LocalStore(tmp_path / "store")
    there, here = liveness.Heartbeat(store, "a1"), liveness.Heartbeat(store, "b2")
    there.start()
    try:
        there.running("a1.0")
        there.running("a1.1")
        await wait_until(lambda: store.exists(liveness.heartbeat_key("a1")))
        first = await here.look(["a1.0", "a1.1"], {})
        assert first.living == ("a1",)
        await asyncio.sleep(0.2)
        again = await here.look(["a1.0"], first.seen)
        assert again.living == ("a1",) and again.seen != first.seen
        there.ended(["a1.1"])
        await asyncio.sleep(0.2)
        assert (await here.look(["a1.1"], again.seen)).living == ()  # changed, but its run ended
        there.ended(["a1.0"])
        await asyncio.sleep(0.2)
        idle = await here.look(["a1.0"], {})
        await asyncio.sleep(0.2)
        assert (await here.look(["a1.0"], idle.seen)).living == ()  # not written since
    finally:
        await there.stop()
    assert (await here.look(["a1.0"], {})).living == ()  # deleted on stop
    here.running("b2.0")
    assert (await here.look(["b2.0", uuid.uuid4().hex], {})).living == ("b2",)
    here.ended(["b2.0"])
    assert (await here.look(["b2.0"], {})).living == ()


async def test_a_run_that_ended_takes_its_own_count_back(tmp_path):
    """A first delivery that ended unacknowledged leaves -1 (the next suspect counts none); a suspect's run takes
    back the one it added; a count another delivery's acknowledgement removed stays removed."""
    runs = InterruptedRuns(LocalStore(tmp_path / "store"), limit=2)
    await runs.finished("m-1", first=True)
    assert [await runs.start("m-1"), await runs.start("m-1")] == [0, 1]
    await runs.finished("m-1", first=False)
    assert await runs.start("m-1") == 1
    await runs.finished("m-1", first=True)
    await runs.finished("m-1", first=True)
    assert json.loads((await runs._store.get(runs_key("m-1"))).data)["runs"] == -1
    await runs.clear("m-1")
    await runs.finished("m-1", first=False)
    assert not await runs._store.exists(runs_key("m-1"))
    assert await runs.start("m-1") == 1
