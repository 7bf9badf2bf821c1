"""The single consumer: highest priority first, batches where a handler can batch, ack only after the outcome
is durable.

Deliveries land in a local priority heap (RabbitMQ's priority queue orders what is not yet delivered; the heap
orders what is prefetched). A worker takes the most urgent message and, if its handler batches, other
messages of the same type already delivered, up to the handler's batch size, so a backlog of index messages
is embedded in one forward pass without waiting for more to arrive.

Every message is settled exactly once, after its outcome is durable:
    succeeded            -> reply to the requester (if any), ack
    failed, permanent    -> copy to the dead-letter exchange with the reason (confirmed), reply, ack
    failed, transient    -> copy to a delayed retry queue with attempts + 1 (confirmed), ack;
                            after MAX_ATTEMPTS, dead-lettered instead
A crash at any point leaves the message unacked, so RabbitMQ delivers it again; handlers are idempotent by id.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from contract import metrics
from contract.bucket_events import BUCKET_EVENT, event_message_id, parse_bucket_event
from contract.jobs import RECORD_HEADER, JobRecord, JobStore
from contract.messages import JSON, MSGPACK, ContractError, ErrorInfo, JobReply, decode_job, encode
from infra.broker import (
    ATTEMPTS_HEADER,
    FIRST_FAILURE_HEADER,
    LAST_FAILURE_HEADER,
    REASON_CODE_HEADER,
    REASON_HEADER,
    RETRY_DELAY_HEADER,
    ROUTING_KEY_HEADER,
    BrokerUnavailableError,
    Publisher,
    declare_topology,
    retry_delay,
    topology_on,
)
from processor.handlers.base import Handler, Job
from processor.ops.headers import REPLAYED_AT_HEADER
from processor.outcomes import Failed, Outcome, Succeeded
from processor.retrying import TRANSIENT_ERRORS
from processor.tracking import JobTracker, Tracked

log = structlog.get_logger(__name__)


def _attempt(message: AbstractIncomingMessage) -> int:
    """This delivery's attempt number (1 for the first)."""
    return int((message.headers or {}).get(ATTEMPTS_HEADER, 0) or 0) + 1


def job_type(message: AbstractIncomingMessage) -> str:
    """The job type: the AMQP `type`, or `bucket.event` for notifications routed with that key (MinIO and
    other notifiers cannot set `type`)."""
    if message.type:
        return message.type
    return BUCKET_EVENT if message.routing_key == BUCKET_EVENT else ""


def job_id(message: AbstractIncomingMessage) -> str | None:
    """The AMQP `message_id`; a bucket event without one gets a stable id derived from its body."""
    if message.message_id:
        return message.message_id
    return event_message_id(message.body) if job_type(message) == BUCKET_EVENT else None


def _replayed(message: AbstractIncomingMessage) -> bool:
    """Whether an operator replayed this message from the dead letters (`ams-ops dlq replay`)."""
    return bool((message.headers or {}).get(REPLAYED_AT_HEADER))


def _recorded_outcome(record: JobRecord) -> Outcome:
    """The outcome a settled job record holds."""
    if record.status == "succeeded":
        return Succeeded(record.result or {})
    error = record.error or ErrorInfo(code="failed", message="the job failed")
    return Failed(error.code, error.message)


def _now_iso() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Consumer:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        publisher: Publisher,
        handlers: Mapping[str, Handler],
        disabled: Mapping[str, str],
        max_attempts: int,
        jobs: JobStore,
        capabilities: Sequence[str],
    ) -> None:
        self._connection = connection
        self.capabilities = tuple(capabilities)
        self._publisher = publisher
        self._handlers = dict(handlers)
        self._disabled = dict(disabled)
        self._max_attempts = max_attempts
        self._tracker = JobTracker(jobs)
        self._records: dict[str, Tracked] = {}
        self._heap: list[tuple[int, int, AbstractIncomingMessage]] = []
        self._sequence = itertools.count()
        self._wakeup = asyncio.Event()
        self._channel: AbstractChannel | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._worker: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def prefetch(self) -> int:
        return max([handler.batch_size for handler in self._handlers.values()] + [1]) * 2

    async def start(self) -> None:
        await declare_topology(self._connection)
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self.prefetch)
        topology = await topology_on(self._channel)
        for queue in [*(topology.queues[capability] for capability in self.capabilities), topology.unrouted_queue]:
            self._consumers.append((queue, await queue.consume(self._on_message)))
        self._worker = asyncio.create_task(self._work(), name="processor-worker")
        log.info(
            "consumer_started",
            queues=[queue.name for queue, _ in self._consumers],
            prefetch=self.prefetch,
            types=sorted(self._handlers),
        )

    async def stop(self) -> None:
        """Stop taking messages, let the current batch finish, and return the rest to the queue."""
        if self._channel is not None and not self._channel.is_closed:
            for queue, tag in self._consumers:
                await queue.cancel(tag)
        self._consumers.clear()
        if self._worker is not None:
            await self._idle.wait()
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._heap.clear()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        log.info("consumer_stopped")

    @property
    def is_running(self) -> bool:
        return (
            self._worker is not None
            and not self._worker.done()
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        heapq.heappush(self._heap, (-(message.priority or 0), next(self._sequence), message))
        self._wakeup.set()

    def _take_batch(self) -> list[AbstractIncomingMessage]:
        _, _, first = heapq.heappop(self._heap)
        handler = self._handlers.get(job_type(first))
        limit = handler.batch_size if handler is not None else 1
        if limit <= 1 or not self._heap:
            return [first]
        ordered = sorted(self._heap)
        taken = [entry for entry in ordered if job_type(entry[2]) == job_type(first)][: limit - 1]
        if taken:
            chosen = {id(entry[2]) for entry in taken}
            self._heap = [entry for entry in self._heap if id(entry[2]) not in chosen]
            heapq.heapify(self._heap)
        return [first, *(entry[2] for entry in taken)]

    async def _work(self) -> None:
        while True:
            while not self._heap:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take_batch()
            self._idle.clear()
            try:
                await self._process(batch)
            except Exception:
                log.exception("batch_crashed", message_ids=[m.message_id for m in batch])
            finally:
                self._idle.set()

    async def _process(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        jobs: list[tuple[AbstractIncomingMessage, Job]] = []
        for message in messages:
            job = await self._admit(message)
            if job is not None:
                jobs.append((message, job))
        if not jobs:
            return
        handler = self._handlers[jobs[0][1].message_type]
        structlog.contextvars.bind_contextvars(message_ids=[job.message_id for _, job in jobs])
        started = asyncio.get_running_loop().time()
        try:
            outcomes = await self._run(handler, jobs)
        finally:
            structlog.contextvars.unbind_contextvars("message_ids")
        elapsed = asyncio.get_running_loop().time() - started
        for (message, job), outcome in zip(jobs, outcomes, strict=True):
            await self._settle(message, job, outcome, elapsed)

    async def _run(self, handler: Handler, jobs: Sequence[tuple[AbstractIncomingMessage, Job]]) -> list[Outcome]:
        """Outcomes in order. A tracked job whose record is already settled (a redelivery after the outcome was
        recorded, or a duplicate that another processor finished) is not run again: its recorded outcome stands."""
        outcomes: dict[str, Outcome] = {}
        to_run: list[Job] = []
        for message, job in jobs:
            if self._tracked(handler, message):
                try:
                    tracked = await self._tracker.load(job, replayed=_replayed(message))
                    self._records[job.message_id] = tracked
                    if not tracked.settled and handler.reports_running:
                        await self._tracker.running(tracked, _attempt(message))
                except TRANSIENT_ERRORS as exc:
                    outcomes[job.message_id] = Failed("storage_unavailable", str(exc), transient=True)
                    continue
                if tracked.settled:
                    outcomes[job.message_id] = _recorded_outcome(tracked.record)
                    continue
            to_run.append(job)
        if to_run:
            try:
                results: Sequence[Outcome] = await handler.handle(to_run)
            except Exception as exc:
                log.exception("handler_crashed", job_type=handler.message_type)
                results = [Failed("internal_error", f"{type(exc).__name__}: {exc}")] * len(to_run)
            outcomes.update({job.message_id: outcome for job, outcome in zip(to_run, results, strict=True)})
        return [outcomes[job.message_id] for _, job in jobs]

    def _tracked(self, handler: Handler, message: AbstractIncomingMessage) -> bool:
        return handler.always_record or bool((message.headers or {}).get(RECORD_HEADER))

    async def _admit(self, message: AbstractIncomingMessage) -> Job | None:
        """Decode one message; dead-letter it at once if it breaks the contract or its feature is off."""
        message_id, message_type = job_id(message), job_type(message)
        if not message_id:
            await self._refuse(message, "missing_message_id", "the AMQP `message_id` property is required")
            return None
        reason = self._disabled.get(message_type)
        if reason is not None:
            await self._refuse(message, "feature_disabled", reason)
            return None
        try:
            if message_type == BUCKET_EVENT:
                payload: object = parse_bucket_event(message.body)
            else:
                payload = decode_job(message.type, message.content_type, message.body)
        except ContractError as exc:
            await self._refuse(message, exc.code, exc.message)
            return None
        if message_type not in self._handlers:
            await self._refuse(message, "unknown_type", f"no handler for {message_type!r}")
            return None
        return Job(
            message_id=message_id,
            message_type=message_type,
            payload=payload,
            priority=message.priority or 0,
        )

    async def _refuse(self, message: AbstractIncomingMessage, code: str, text: str) -> None:
        """Dead-letter a message that cannot even be started, marking its job record failed if it has one."""
        if message.message_id and (message.headers or {}).get(RECORD_HEADER):
            try:
                await self._tracker.refused(message.message_id, Failed(code, text), _attempt(message))
            except TRANSIENT_ERRORS:
                log.warning("job_record_not_updated", message_id=message.message_id, code=code)
        if await self._dead_letter(message, code, text, _attempt(message)):
            metrics.job_settled(job_type(message), "dead_lettered")

    async def _settle(self, message: AbstractIncomingMessage, job: Job, outcome: Outcome, elapsed: float) -> None:
        """Record the outcome (tracked jobs), then reply, then ack; or schedule a retry; or dead-letter."""
        logger = log.bind(message_id=job.message_id, job_type=job.message_type)
        record = self._records.pop(job.message_id, None)
        attempt = _attempt(message)
        if isinstance(outcome, Succeeded) and record is not None and not record.settled:
            try:
                if not await self._tracker.succeeded(record, outcome, attempt):
                    outcome = _recorded_outcome(record.record)
            except TRANSIENT_ERRORS as exc:
                outcome = Failed("storage_unavailable", f"could not record the result: {exc}", transient=True)
        if isinstance(outcome, Succeeded):
            reply = JobReply(
                job_id=job.message_id, status="succeeded", result=outcome.result, attachment=outcome.attachment
            )
            await self._reply(message, reply)
            await self._ack(message)
            metrics.job_settled(job.message_type, "succeeded", elapsed)
            logger.info("job_succeeded", seconds=round(elapsed, 4))
            return
        retry = outcome.transient and attempt < self._max_attempts
        if record is not None and not record.settled:
            try:
                await self._tracker.failed(record, outcome, attempt, final=not retry)
            except TRANSIENT_ERRORS:
                logger.warning("job_record_not_updated", code=outcome.code)
        if retry:
            delay = retry_delay(attempt)
            try:
                await self._publisher.republish(
                    message,
                    to_dead_letters=False,
                    message_id=job.message_id,
                    message_type=job.message_type,
                    headers={
                        **self._failure_headers(message, outcome, attempt),
                        RETRY_DELAY_HEADER: str(delay),
                    },
                )
            except BrokerUnavailableError:
                logger.warning("retry_publish_failed", code=outcome.code)
                await self._requeue(message)
                return
            await self._ack(message)
            metrics.job_settled(job.message_type, "retried", elapsed)
            logger.warning(
                "job_retry_scheduled",
                code=outcome.code,
                reason=outcome.message,
                attempt=attempt,
                delay_seconds=delay,
            )
            return
        if await self._dead_letter(message, outcome.code, outcome.message, attempt):
            metrics.job_settled(job.message_type, "dead_lettered", elapsed)

    @staticmethod
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

    async def _dead_letter(self, message: AbstractIncomingMessage, code: str, text: str, attempts: int = 1) -> bool:
        """Move the message to the dead-letter queue (confirmed), tell a waiting requester, then ack it.
        If the copy cannot be published, the message stays unacked and comes back (False)."""
        outcome = Failed(code, text)
        message_id, message_type = job_id(message), job_type(message)
        try:
            await self._publisher.republish(
                message,
                to_dead_letters=True,
                message_id=message_id,
                message_type=message_type or None,
                headers=self._failure_headers(message, outcome, attempts),
            )
        except BrokerUnavailableError:
            log.warning("dead_letter_publish_failed", message_id=message_id, code=code)
            await self._requeue(message)
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

    async def _reply(self, message: AbstractIncomingMessage, reply: JobReply) -> None:
        """Answer on reply_to in the request's own encoding (JSON for JSON requests, else msgpack)."""
        if message.reply_to and message.correlation_id:
            kind = JSON if (message.content_type or JSON).split(";")[0].strip().lower() == JSON else MSGPACK
            await self._publisher.reply(message.reply_to, message.correlation_id, encode(reply, kind), kind)

    @staticmethod
    async def _requeue(message: AbstractIncomingMessage) -> None:
        """Give the message back to the queue after a pause (its outcome could not be recorded)."""
        await asyncio.sleep(1.0)
        try:
            await message.nack(requeue=True)
        except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.warning("nack_lost_redelivery_expected", message_id=message.message_id, error=str(exc))

    @staticmethod
    async def _ack(message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.warning("ack_lost_redelivery_expected", message_id=message.message_id, error=str(exc))
