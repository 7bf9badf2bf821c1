"""Settling a delivery, exactly once, after its outcome is durable:

    succeeded            -> record (tracked jobs; seen at once, flushed to a local disk after the reply), reply to
                            the requester (if any), flush the record and the outputs not yet flushed, announce, ack
    failed, permanent    -> record, announce, copy to the dead-letter exchange with the reason (confirmed), reply,
                            ack; a record that cannot be written: handed back (below), the next delivery writes it
    failed, transient    -> record, copy to a delayed retry queue with attempts + 1 (confirmed; the queue waits at
                            least the failure's retry_after), ack;
                            after MAX_ATTEMPTS, dead-lettered instead
    deferred             -> copy to a delay queue, no attempt counted (confirmed), ack: a redelivery whose job's run
                            lives on elsewhere (processor/liveness.py)
    withdrawn            -> ack (the API withdrew the job: its record says so, and nobody waits for it)
    cancelled            -> reply (the job's error, to a requester still waiting), announce, ack (its client
                            cancelled it)
    superseded failure   -> a failure (transient or final) of a delivery whose job's record another delivery finished
                            meanwhile (a duplicate run at once): settled as that record says, as a success that finds
                            the record settled is (its own error neither recorded, retried nor dead-lettered)
    refused              -> a message that cannot even be started (`refuse`): with a job record, a final failure as
                            above (superseded too); without one, dead-lettered

"announce": a job whose record says it ended has its end published to ams.events (contract/events.py,
JOB_EVENTS_ENABLED) and, with a callback URL, its callback queued (contract/callbacks.py), confirmed, before its
message is acked; owed in the object store when RabbitMQ does not take
it (processor/announcer.py); a redelivery announces it again under the same event id.

A retry waits in the retry queues, not here. When the broker refuses the copy, or the store a final failure's
record, the delivery is handed back (nack, requeue) after REQUEUE_DELAY_SECONDS on a timer, so the batches behind it
are not held up and a broker that keeps refusing does not get the same message back in a tight loop; a stop hands
such deliveries back at once (the channel's close returns them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage

from contract import metrics
from contract.announcements import to_announce
from contract.bucket_events import BUCKET_EVENT
from contract.errors import ErrorInfo
from contract.jobs import CANCELLED, RECORD_HEADER, JobRecord, JobStore, called_off, generated_output
from contract.messages import JOB_TYPES, JSON, MSGPACK, JobReply, encode
from infra.broker import (
    ATTEMPTS_HEADER,
    DEFERRAL_HEADER,
    FIRST_FAILURE_HEADER,
    LAST_FAILURE_HEADER,
    REASON_CODE_HEADER,
    REASON_HEADER,
    RETRY_DELAY_HEADER,
    ROUTING_KEY_HEADER,
    BrokerUnavailableError,
    Publisher,
    retry_delay,
)
from infra.storage import ObjectStore
from processor.announcer import Announcer
from processor.deliveries import attempt, job_id, job_type, replayed
from processor.handlers.base import Job
from processor.outcomes import CalledOff, Failed, Settlement, Succeeded
from processor.outputs import drop_unrecorded, output_lost
from processor.retrying import TRANSIENT_ERRORS, retry_transient
from processor.tracking import JobTracker, Tracked

log = structlog.get_logger(__name__)

REQUEUE_DELAY_SECONDS = 1.0


def recorded_outcome(record: JobRecord, outputs: tuple[str, ...] = ()) -> Settlement:
    """The outcome a settled job record holds; a success's `outputs` are flushed again before its ack (an earlier
    delivery may have stored them and stopped before flushing them)."""
    if record.status == "succeeded":
        return Succeeded(record.result or {}, unflushed=outputs)
    error = record.error or ErrorInfo(code="failed", message="the job failed")
    if called_off(record):
        return CalledOff(error.code, error.message)
    return Failed(error.code, error.message)


def _now_iso() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Settler:
    def __init__(
        self,
        publisher: Publisher,
        jobs: JobStore,
        store: ObjectStore,
        max_attempts: int,
        *,
        announcer: Announcer | None = None,
        processor: str | None = None,
    ) -> None:
        """`processor`: the id this processor's running marks name (processor/liveness.py)."""
        self._publisher = publisher
        self._announcer = announcer
        self._store = store
        self.tracker = JobTracker(jobs, processor)
        self._max_attempts = max_attempts
        self._requeues: dict[int, asyncio.TimerHandle] = {}
        self._nacks: set[asyncio.Task[None]] = set()

    async def settle(
        self,
        message: AbstractIncomingMessage,
        job: Job,
        outcome: Settlement,
        elapsed: float | None,
        record: Tracked | None,
    ) -> None:
        """Record the outcome (tracked jobs), then reply, then ack; or schedule a retry; or dead-letter. `elapsed`:
        the run's seconds (None: it did not run, a refusal)."""
        logger = log.bind(message_id=job.message_id, job_type=job.message_type)
        number = attempt(message)
        if record is not None:
            recorded = await self._recorded(message, job, outcome, number, record)
            if recorded is None:
                return
            outcome = recorded
        if isinstance(outcome, CalledOff):
            if outcome.code == CANCELLED:
                error = ErrorInfo(code=outcome.code, message=outcome.reason)
                await self._reply(message, JobReply(job_id=job.message_id, status="failed", error=error))
                if not await self._announced(message, record.record if record is not None else None):
                    return
            await self._ack(message)
            metrics.job_settled(job.message_type, outcome.code, elapsed)
            logger.warning(f"job_{outcome.code}_not_run", reason=outcome.reason)
            return
        if isinstance(outcome, Succeeded):
            reply = JobReply(
                job_id=job.message_id, status="succeeded", result=outcome.result, attachment=outcome.attachment
            )
            await self._reply(message, reply)
            try:
                await self._flush(outcome.unflushed, record)
            except TRANSIENT_ERRORS as exc:
                logger.warning("job_outcome_not_flushed", error=str(exc))
                self._requeue_later(message)
                return
            if not await self._announced(message, record.record if record is not None else None):
                return
            await self._ack(message)
            metrics.job_settled(job.message_type, "succeeded", elapsed)
            logger.info("job_succeeded", seconds=None if elapsed is None else round(elapsed, 4))
            return
        if self._retried(outcome, number):
            await self._retry(message, job, outcome, number, elapsed)
            return
        if not await self._announced(message, record.record if record is not None else None):
            return
        if await self.dead_letter(message, outcome.code, outcome.message, number):
            metrics.job_settled(job.message_type, "dead_lettered", elapsed)

    def _retried(self, outcome: Failed, number: int) -> bool:
        """Whether a failure at attempt `number` is retried (else it is final)."""
        return outcome.transient and number < self._max_attempts

    async def _recorded(
        self, message: AbstractIncomingMessage, job: Job, outcome: Settlement, number: int, record: Tracked
    ) -> Settlement | None:
        """Record a tracked job's outcome; the outcome to settle then (None: the delivery was handed back). A job whose
        record another delivery settled meanwhile settles as that record says: a success drops the output it made
        that the record does not name, and a failure is superseded (`_record_failure`)."""
        if isinstance(outcome, Succeeded) and not record.settled:
            try:
                if not await self.tracker.succeeded(record, outcome, number):
                    # settled by another delivery (or a remade output deleted by its client meanwhile): an output
                    # this one made that its record does not name goes
                    await drop_unrecorded(self._store, outcome.created, record.record)
                    outcome = recorded_outcome(record.record)
            except TRANSIENT_ERRORS as exc:
                outcome = Failed("storage_unavailable", f"could not record the result: {exc}", transient=True)
        if isinstance(outcome, Failed):
            return await self._record_failure(message, job, outcome, number, record)
        return outcome

    async def _record_failure(
        self, message: AbstractIncomingMessage, job: Job, outcome: Failed, number: int, record: Tracked
    ) -> Settlement | None:
        """Record a failure, final or to be retried; the outcome to settle then (None: a final failure whose record
        could not be written, handed back: the next delivery writes it). A failure whose job's record another
        delivery finished (found so before its write, or by it: succeeded, failed, or called off) is superseded: it
        settles as the record says, as any delivery that finds it finished does (not retried, and a dead letter
        only for a failed record, under the recorded reason). A remake of a lost output is not superseded (its record
        says succeeded, but the output is still missing), nor a failure whose record is not finished (a job run
        anew under another delivery: tracking.py, `failed`)."""
        logger = log.bind(message_id=job.message_id, job_type=job.message_type)
        if not record.settled:
            try:
                if await self.tracker.failed(record, outcome, number, final=not self._retried(outcome, number)):
                    return outcome
            except TRANSIENT_ERRORS:
                logger.warning("job_record_not_updated", code=outcome.code)
                if not self._retried(outcome, number):  # its end must be recorded before it leaves the queue
                    self._requeue_later(message)
                    return None
                return outcome
            if not record.settled:
                return outcome
        ended = recorded_outcome(record.record)
        if ended != outcome:
            recorded_error = record.record.error
            logger.warning(
                "job_failure_superseded",
                code=outcome.code,
                recorded_status=record.record.status,
                recorded_code=recorded_error.code if recorded_error is not None else None,
            )
        return ended

    async def _flush(self, outputs: tuple[str, ...], record: Tracked | None) -> None:
        """Flush a success's outputs and its record to a local disk, side by side: whichever a power failure
        loses, the unacked message comes again and finds the record as it was or the output lost (and remade)."""
        flushes = [retry_transient(lambda key=key: self._store.flush(key)) for key in outputs]
        if record is not None:
            flushes.append(self.tracker.flush(record))
        await asyncio.gather(*flushes)

    async def refuse(self, message: AbstractIncomingMessage, code: str, text: str) -> None:
        """Dead-letter a message that cannot even be started. One whose job has a record is settled as a final
        failure of that job (`settle`): recorded failed, or, when another delivery finished the record, superseded
        by its recorded end, unless that is a success whose output was lost (then dead-lettered under its own code:
        a replay remakes the output). A record that cannot be read or written: the delivery is handed back, and the
        next one writes it."""
        if message.message_id and (message.headers or {}).get(RECORD_HEADER):
            try:
                tracked = await self.tracker.stored(message.message_id, replayed=replayed(message))
                if tracked is not None:
                    tracked.remaking = await self._output_lost(tracked.record)
            except TRANSIENT_ERRORS:
                log.warning("job_record_not_updated", message_id=message.message_id, code=code)
                self._requeue_later(message)
                return
            if tracked is not None:
                job = Job(message.message_id, _counted_type(job_type(message)), None, message.priority or 0)
                await self.settle(message, job, Failed(code, text), None, tracked)
                return
        if await self.dead_letter(message, code, text, attempt(message)):
            metrics.job_settled(_counted_type(job_type(message)), "dead_lettered")

    async def _output_lost(self, record: JobRecord) -> bool:
        """Whether the output a succeeded generation's record names is lost: a refusal of its job then fails as a
        remake's run does, not superseded by the success (the output is still missing; a replay remakes it)."""
        key = generated_output(record)
        return key is not None and record.output_deleted is None and await output_lost(self._store, key)

    async def _retry(
        self, message: AbstractIncomingMessage, job: Job, outcome: Failed, number: int, elapsed: float | None
    ) -> None:
        delay = retry_delay(number, outcome.retry_after or 0.0)
        headers = {**_failure_headers(message, outcome, number), RETRY_DELAY_HEADER: str(delay)}
        if not await self._delayed(message, job, headers, "retry_publish_failed", code=outcome.code):
            return
        metrics.job_settled(job.message_type, "retried", elapsed)
        log.warning(
            "job_retry_scheduled",
            message_id=job.message_id,
            job_type=job.message_type,
            code=outcome.code,
            reason=outcome.message,
            attempt=number,
            delay_seconds=delay,
        )

    async def defer(self, message: AbstractIncomingMessage, job: Job, deferral: str, delay: int) -> None:
        """Send a suspect whose job's run lives on elsewhere round the delay queue of `delay` seconds, carrying
        `deferral` (its deferral header: processor/liveness.py), with no attempt counted, then ack it. When the broker
        does not take the copy, the delivery is handed back, and comes again."""
        headers = {DEFERRAL_HEADER: deferral, RETRY_DELAY_HEADER: str(delay)}
        if await self._delayed(message, job, headers, "deferral_publish_failed"):
            metrics.job_settled(job.message_type, "deferred")

    async def _delayed(
        self, message: AbstractIncomingMessage, job: Job, headers: dict[str, str | int], failed: str, **context: str
    ) -> bool:
        """Copy the message to the delay queue its RETRY_DELAY_HEADER names, with `headers`, then ack it; False when
        the broker does not take the copy (logged as `failed`): the delivery is then handed back, and comes again."""
        try:
            await self._publisher.republish(
                message,
                to_dead_letters=False,
                message_id=job.message_id,
                message_type=job.message_type,
                headers=headers,
            )
        except BrokerUnavailableError:
            log.warning(failed, message_id=job.message_id, **context)
            self._requeue_later(message)
            return False
        await self._ack(message)
        return True

    async def dead_letter(self, message: AbstractIncomingMessage, code: str, text: str, attempts: int = 1) -> bool:
        """Move the message to the dead-letter queue (confirmed), tell a waiting requester, then ack it.
        If the copy cannot be published, the message is handed back and comes again (False)."""
        message_id, message_type = job_id(message), job_type(message)
        try:
            await self._publisher.republish(
                message,
                to_dead_letters=True,
                message_id=message_id,
                message_type=message_type or None,
                headers=_failure_headers(message, Failed(code, text), attempts),
            )
        except BrokerUnavailableError:
            log.warning("dead_letter_publish_failed", message_id=message_id, code=code)
            self._requeue_later(message)
            return False
        await self._reply(
            message,
            JobReply(job_id=message_id or "", status="failed", error=ErrorInfo(code=code, message=text)),
        )
        await self._ack(message)
        log.warning(
            "job_dead_lettered",
            message_id=message_id,
            job_type=message_type,
            code=code,
            reason=text,
            attempts=attempts,
        )
        return True

    async def _announced(self, message: AbstractIncomingMessage, record: JobRecord | None) -> bool:
        """Announce the end of a job whose record says it ended (nothing for one without a record, one whose record
        is not finished, not written or a retry, nor a withdrawn one). False when the event could neither be
        published nor owed: the delivery is handed back, and its redelivery, finding the record settled, announces
        it then."""
        if self._announcer is None or record is None or not to_announce(record, self._announcer.events):
            return True
        try:
            await self._announcer.announce(record)
        except TRANSIENT_ERRORS as exc:
            log.warning("job_event_not_published", message_id=message.message_id, error=str(exc))
            self._requeue_later(message)
            return False
        return True

    def hand_back(self, messages: Iterable[AbstractIncomingMessage]) -> None:
        """Hand back (nack, requeue, on the timer) those of `messages` that are neither settled nor on their way back
        already: what a settlement or a batch that failed unforeseen left unsettled."""
        for message in messages:
            if not message.processed and id(message) not in self._requeues:
                self._requeue_later(message)

    def forget_requeues(self) -> None:
        """On stop: drop the pending hand-backs (closing the channel returns those deliveries)."""
        for handle in self._requeues.values():
            handle.cancel()
        self._requeues.clear()

    async def _reply(self, message: AbstractIncomingMessage, reply: JobReply) -> None:
        """Answer on reply_to in the request's own encoding (JSON for JSON requests, else msgpack)."""
        if message.reply_to and message.correlation_id:
            kind = JSON if (message.content_type or JSON).split(";")[0].strip().lower() == JSON else MSGPACK
            await self._publisher.reply(message.reply_to, message.correlation_id, encode(reply, kind), kind)

    def _requeue_later(self, message: AbstractIncomingMessage) -> None:
        key = id(message)
        self._requeues[key] = asyncio.get_running_loop().call_later(
            REQUEUE_DELAY_SECONDS, self._start_nack, key, message
        )

    def _start_nack(self, key: int, message: AbstractIncomingMessage) -> None:
        self._requeues.pop(key, None)
        task = asyncio.create_task(_nack(message))
        self._nacks.add(task)
        task.add_done_callback(self._nacks.discard)

    @staticmethod
    async def _ack(message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.warning("ack_lost_redelivery_expected", message_id=message.message_id, error=str(exc))


async def _nack(message: AbstractIncomingMessage) -> None:
    try:
        await message.nack(requeue=True)
    except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
        log.warning("nack_lost_redelivery_expected", message_id=message.message_id, error=str(exc))


def _counted_type(message_type: str) -> str:
    """A refused message's type as a metric label: a known job type (or bucket.event), else "unknown" (the type is
    whatever its publisher set, and each would be a series of its own)."""
    return message_type if message_type in JOB_TYPES or message_type == BUCKET_EVENT else "unknown"


def _failure_headers(message: AbstractIncomingMessage, outcome: Failed, attempts: int) -> dict[str, str | int]:
    headers = message.headers or {}
    now = _now_iso()
    return {
        ATTEMPTS_HEADER: attempts,
        REASON_CODE_HEADER: outcome.code,
        REASON_HEADER: outcome.message[:1000],
        ROUTING_KEY_HEADER: str(headers.get(ROUTING_KEY_HEADER) or message.routing_key or job_type(message)),
        FIRST_FAILURE_HEADER: str(headers.get(FIRST_FAILURE_HEADER) or now),
        LAST_FAILURE_HEADER: now,
    }
