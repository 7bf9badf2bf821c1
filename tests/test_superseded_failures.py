"""Two deliveries of one job run at once (a resend, a redelivery after a lost connection, a duplicate from an upstream
system): one ends and records its end, and the other then fails. The failing one settles as the record says, as a
success that finds the record settled does: no retry and no dead letter of its own, its requester answered with the
recorded outcome, no contradictory end announced. A lost output's remake, and a run taken for dead while the job runs
anew, still fail as before.

The deliveries are real messages taken from `ams.image` on a real RabbitMQ node and settled by the processor's
settler in the order each test gives, as the consumer settles them; the records live in the embedded store."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import msgspec
import pytest

from contract.events import JobFinishedV1
from contract.jobs import RECORD_HEADER, JobStore, cancel_queued
from contract.messages import IMAGE_GENERATE, JobReply
from infra.broker import EVENTS_EXCHANGE, Publisher, connect, declare_topology
from infra.storage.local import LocalStore
from processor.announcer import Announcer
from processor.handlers.base import Job
from processor.outcomes import Failed, Settlement, Succeeded
from processor.settler import Settler
from processor.tracking import Tracked
from tests.support.amqp import next_reply, publish, wait_until
from tests.support.rabbitmq import RabbitNode

MAX_ATTEMPTS = 3
PARAMS = {"prompt": "a job run twice at once", "width": 64, "height": 64, "steps": 2, "seed": 5}
OWN = "device_memory_unavailable"  # the failing delivery's own error


@dataclass
class Deliveries:
    """One vhost: the settler, the job store, a subscriber's queue of job events and the requesters' reply queue."""

    rabbit: RabbitNode
    vhost: str
    url: str
    settler: Settler
    jobs: JobStore
    channel: aio_pika.abc.AbstractChannel
    events: aio_pika.abc.AbstractQueue
    replies: aio_pika.abc.AbstractQueue
    store: LocalStore

    async def job(self) -> Job:
        """A tracked generation whose record the API wrote (queued)."""
        record = JobStore.new(str(uuid.uuid4()), IMAGE_GENERATE, PARAMS)
        await self.jobs.create(record)
        return Job(message_id=record.job_id, message_type=IMAGE_GENERATE, payload=None, priority=9)

    async def delivered(self, job: Job) -> aio_pika.abc.AbstractIncomingMessage:
        """A delivery of the job's message, with a requester waiting on the reply queue, taken unacknowledged."""
        await publish(
            self.url,
            IMAGE_GENERATE,
            PARAMS,
            message_id=job.message_id,
            headers={RECORD_HEADER: True},
            reply_to=self.replies.name,
        )
        queue = await self.channel.get_queue("ams.image")
        message = await queue.get(no_ack=False, fail=False, timeout=5)
        assert message is not None
        return message

    async def running(self, job: Job, *, replayed: bool = False) -> Tracked:
        """The job's record as a delivery reads it, marked running as the consumer marks it."""
        tracked = await self.settler.tracker.load(job, replayed=replayed)
        assert await self.settler.tracker.mark_running(tracked, 1)
        return tracked

    async def settle(
        self, message: aio_pika.abc.AbstractIncomingMessage, job: Job, outcome: Settlement, tracked: Tracked
    ) -> None:
        await self.settler.settle(message, job, outcome, 0.1, tracked)

    def counts(self) -> dict[str, tuple[int, int]]:
        return self.rabbit.queue_counts(self.vhost)

    async def all_acknowledged(self) -> None:
        await wait_until(lambda: self.counts()["ams.image"] == (0, 0), timeout=10)

    def retries_waiting(self) -> int:
        return sum(ready + taken for name, (ready, taken) in self.counts().items() if name.startswith("ams.retry"))

    async def dead_letters(self) -> list[aio_pika.abc.AbstractIncomingMessage]:
        queue = await self.channel.get_queue("ams.dead")
        taken = []
        while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
            taken.append(message)
        return taken

    async def reply(self) -> JobReply:
        message = await next_reply(self.replies, timeout=5)
        assert message is not None, "no reply"
        return msgspec.json.decode(message.body, type=JobReply)

    async def announced(self) -> list[JobFinishedV1]:
        found = []
        while (message := await next_reply(self.events, timeout=0.5)) is not None:
            found.append(msgspec.json.decode(message.body, type=JobFinishedV1))
        return found


@pytest.fixture
async def deliveries(make_env, rabbit, tmp_path) -> AsyncIterator[Deliveries]:
    env = make_env()
    connection = await connect(env["AMQP_URL"])
    async with connection:
        await declare_topology(connection)
        publisher = await Publisher.open(connection)
        store = LocalStore(tmp_path / "store")
        jobs = JobStore(store, 7)
        settler = Settler(publisher, jobs, store, MAX_ATTEMPTS, announcer=Announcer(publisher, store))
        channel = await connection.channel()
        events = await channel.declare_queue(exclusive=True)
        await events.bind(EVENTS_EXCHANGE, routing_key="#")
        replies = await channel.declare_queue(exclusive=True)
        yield Deliveries(rabbit, env["VHOST"], env["AMQP_URL"], settler, jobs, channel, events, replies, store)


def _failure(final: bool) -> Failed:
    """The failing delivery's own failure; a retry waits two minutes (the longest delay queue), so it is still
    there when the test looks."""
    return Failed(OWN, "out of device memory", transient=not final, retry_after=None if final else 60.0)


@pytest.mark.parametrize("final", [False, True], ids=["transient", "final"])
@pytest.mark.parametrize("found", ["writing its failure", "marking its run"])
async def test_a_failure_after_a_duplicates_success_settles_as_succeeded(deliveries, final, found):
    """The other delivery succeeds and records it; this one then fails, transiently or for good. It finds the record
    succeeded when it writes its failure (its running mark was written before the success), or already when its mark
    is written (it read the record before the success): either way it is neither retried nor dead-lettered, its
    requester is answered with the recorded result, and only the success is announced."""
    job = await deliveries.job()
    winner_message, loser_message = await deliveries.delivered(job), await deliveries.delivered(job)
    winner = await deliveries.running(job)
    if found == "writing its failure":
        loser = await deliveries.running(job)
    else:
        loser = await deliveries.settler.tracker.load(job)
    result = {"key": f"images/generated/{job.message_id}.png", "seed": 5}
    await deliveries.settle(winner_message, job, Succeeded(result), winner)
    assert (await deliveries.reply()).status == "succeeded"
    if found == "marking its run":
        assert not await deliveries.settler.tracker.mark_running(loser, 1)  # the consumer's still_wanted says so

    await deliveries.settle(loser_message, job, _failure(final), loser)

    stored = await deliveries.jobs.get(job.message_id)
    assert (stored.status, stored.result, stored.error, stored.marks) == ("succeeded", result, None, [])
    await deliveries.all_acknowledged()
    assert deliveries.retries_waiting() == 0
    assert await deliveries.dead_letters() == []
    reply = await deliveries.reply()
    assert (reply.job_id, reply.status, reply.result, reply.error) == (job.message_id, "succeeded", result, None)
    announced = await deliveries.announced()
    assert announced and {(event.status, event.event_id) for event in announced} == {
        ("succeeded", announced[0].event_id)
    }


@pytest.mark.parametrize("final", [False, True], ids=["transient", "final"])
async def test_a_failure_after_a_duplicates_final_failure_settles_as_that_failure(deliveries, final):
    """The newer of two deliveries fails for good, taking the older one's mark off with its own (taken for dead), and
    the job ends failed. The older one then fails too: it settles as the recorded failure, as any delivery that finds
    it does: its requester gets the recorded error, it is not retried, and the dead letter it leaves carries the
    recorded reason, not its own; nothing but that end is announced."""
    job = await deliveries.job()
    older_message, newer_message = await deliveries.delivered(job), await deliveries.delivered(job)
    older = await deliveries.running(job)
    newer = await deliveries.running(job)
    await deliveries.settle(newer_message, job, Failed("too_expensive", "over the pixel-step budget"), newer)
    assert (await deliveries.reply()).error.code == "too_expensive"

    await deliveries.settle(older_message, job, _failure(final), older)

    stored = await deliveries.jobs.get(job.message_id)
    assert (stored.status, stored.error.code, stored.marks) == ("failed", "too_expensive", [])
    await deliveries.all_acknowledged()
    assert deliveries.retries_waiting() == 0
    assert {dead.headers["x-ams-reason-code"] for dead in await deliveries.dead_letters()} == {"too_expensive"}
    reply = await deliveries.reply()
    assert (reply.status, reply.error.code) == ("failed", "too_expensive")
    announced = await deliveries.announced()
    assert {(event.status, event.event_id) for event in announced} == {("failed", announced[0].event_id)}


async def test_a_failure_of_a_job_cancelled_before_its_mark_settles_as_cancelled(deliveries):
    """The job is cancelled between the delivery's read of its record and its running mark, and its run fails before
    it looks at the mark: it settles as cancelled (its requester told so), not retried and not dead-lettered."""
    job = await deliveries.job()
    message = await deliveries.delivered(job)
    tracked = await deliveries.settler.tracker.load(job)
    assert await cancel_queued(deliveries.jobs, job.message_id) is not None
    assert not await deliveries.settler.tracker.mark_running(tracked, 1)

    await deliveries.settle(message, job, _failure(final=False), tracked)

    assert (await deliveries.jobs.get(job.message_id)).error.code == "cancelled"
    await deliveries.all_acknowledged()
    assert deliveries.retries_waiting() == 0
    assert await deliveries.dead_letters() == []
    reply = await deliveries.reply()
    assert (reply.status, reply.error.code) == ("failed", "cancelled")


@pytest.mark.parametrize("final", [False, True], ids=["transient", "final"])
async def test_a_remakes_failure_is_still_retried_or_dead_lettered(deliveries, final):
    """A succeeded record whose output was lost: the job runs again to remake it, and that run fails. The record
    stays succeeded, but the output is still missing, so the message is retried (or dead-lettered) as before."""
    job = await deliveries.job()
    message = await deliveries.delivered(job)
    first = await deliveries.running(job)
    assert await deliveries.settler.tracker.succeeded(first, Succeeded({"key": "images/generated/lost.png"}), 1)
    remake = await deliveries.settler.tracker.load(job)
    remake.remaking = True  # what the consumer does when the output is lost

    await deliveries.settle(message, job, _failure(final), remake)

    assert (await deliveries.jobs.get(job.message_id)).status == "succeeded"
    await deliveries.all_acknowledged()
    if final:
        assert [dead.headers["x-ams-reason-code"] for dead in await deliveries.dead_letters()] == [OWN]
        assert (await deliveries.reply()).error.code == OWN
    else:
        assert deliveries.retries_waiting() == 1


@pytest.mark.parametrize("final", [False, True], ids=["transient", "final"])
async def test_a_run_taken_for_dead_fails_as_before_while_the_job_runs_anew(deliveries, final):
    """The newer delivery failed for good and took the older one's mark off; an operator's replay then runs the job
    anew. The older delivery's late failure writes nothing over the replay's run, and its message is retried (or
    dead-lettered with its own error) as before: the job has not ended, so there is no recorded end to settle as."""
    job = await deliveries.job()
    older_message, newer_message = await deliveries.delivered(job), await deliveries.delivered(job)
    older = await deliveries.running(job)
    newer = await deliveries.running(job)
    await deliveries.settle(newer_message, job, Failed("too_expensive", "over the pixel-step budget"), newer)
    await deliveries.dead_letters()
    replay = await deliveries.running(job, replayed=True)

    await deliveries.settle(older_message, job, _failure(final), older)

    stored = await deliveries.jobs.get(job.message_id)
    assert (stored.status, stored.marks) == ("running", [replay.mark])
    await deliveries.all_acknowledged()
    if final:
        assert [dead.headers["x-ams-reason-code"] for dead in await deliveries.dead_letters()] == [OWN]
    else:
        assert deliveries.retries_waiting() == 1


@pytest.mark.parametrize("ended", ["succeeded", "failed"])
async def test_a_refusal_after_a_duplicates_end_settles_as_that_end(deliveries, ended):
    """The other delivery ends the job; this one is then refused before it runs (its feature is disabled on this
    processor). It settles as the recorded end, as a failure that finds it does: the record is left as it is, its
    requester gets the recorded outcome, and there is a dead letter only for a job that ended failed, under the
    recorded reason; nothing but that end is announced."""
    job = await deliveries.job()
    winner_message, refused_message = await deliveries.delivered(job), await deliveries.delivered(job)
    winner = await deliveries.running(job)
    result = {"key": f"images/generated/{job.message_id}.png", "seed": 5}
    outcome = Succeeded(result) if ended == "succeeded" else Failed("too_expensive", "over the pixel-step budget")
    await deliveries.settle(winner_message, job, outcome, winner)
    assert (await deliveries.reply()).status == ended
    await deliveries.store.put(result["key"], b"the generated image", "image/png")

    await deliveries.settler.refuse(refused_message, "feature_disabled", "image generation is disabled here")

    stored = await deliveries.jobs.get(job.message_id)
    await deliveries.all_acknowledged()
    reply = await deliveries.reply()
    dead = {message.headers["x-ams-reason-code"] for message in await deliveries.dead_letters()}
    if ended == "succeeded":
        assert (stored.status, stored.result, stored.error) == ("succeeded", result, None)
        assert dead == set()
        assert (reply.status, reply.result, reply.error) == ("succeeded", result, None)
    else:
        assert (stored.status, stored.error.code) == ("failed", "too_expensive")
        assert dead == {"too_expensive"}
        assert (reply.status, reply.error.code) == ("failed", "too_expensive")
    announced = await deliveries.announced()
    assert {(event.status, event.event_id) for event in announced} == {(ended, announced[0].event_id)}


async def test_a_refusal_of_an_unfinished_job_is_recorded_and_dead_lettered_as_before(deliveries):
    """A job whose record has not ended: the refusal is its end, recorded, dead-lettered and replied under its own
    code."""
    job = await deliveries.job()
    message = await deliveries.delivered(job)

    await deliveries.settler.refuse(message, "feature_disabled", "image generation is disabled here")

    stored = await deliveries.jobs.get(job.message_id)
    assert (stored.status, stored.error.code) == ("failed", "feature_disabled")
    await deliveries.all_acknowledged()
    assert [dead.headers["x-ams-reason-code"] for dead in await deliveries.dead_letters()] == ["feature_disabled"]
    assert (await deliveries.reply()).error.code == "feature_disabled"


async def test_a_refusal_of_a_job_whose_output_was_lost_is_dead_lettered_under_its_own_code(deliveries):
    """The other delivery succeeded, but the output its record names was lost (a power failure before it was
    flushed); this one, which would remake it, is refused. It is not superseded by the success: the output is still
    missing, so it is dead-lettered under its own code (a replay remakes the output), and the record stays."""
    job = await deliveries.job()
    winner_message, refused_message = await deliveries.delivered(job), await deliveries.delivered(job)
    winner = await deliveries.running(job)
    result = {"key": f"images/generated/{job.message_id}.png", "seed": 5}
    await deliveries.settle(winner_message, job, Succeeded(result), winner)
    assert (await deliveries.reply()).status == "succeeded"

    await deliveries.settler.refuse(refused_message, "feature_disabled", "image generation is disabled here")

    stored = await deliveries.jobs.get(job.message_id)
    assert (stored.status, stored.result) == ("succeeded", result)
    await deliveries.all_acknowledged()
    assert [dead.headers["x-ams-reason-code"] for dead in await deliveries.dead_letters()] == ["feature_disabled"]
    assert (await deliveries.reply()).error.code == "feature_disabled"
