"""The single consumer: deliveries in, outcomes settled.

Each delivery goes into a scheduler (processor/scheduler.py: most urgent first, batched by type, pipelined for
bulk indexing): model work into one, callbacks (network calls, not model work) into one of their own, so a slow
receiver never holds up a model, nor a model a callback. A batch is decoded, run by its handler, and each message
settled (processor/settler.py) after its outcome is durable. A crash at any point leaves the message unacked, so
RabbitMQ delivers it again; handlers are idempotent by id. An exception that escapes one message's settlement hands
that message back (nack, requeue, after a moment) and spares its batch-mates; one that escapes a batch's run hands
back whatever the batch left unsettled.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Mapping, Sequence

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from contract.bucket_events import BUCKET_EVENT, parse_bucket_event
from contract.jobs import RECORD_HEADER, JobStore, age_seconds, queued_record
from contract.messages import ContractError, decode_job
from infra.broker import Publisher, capability_of, declare_topology, topology_on
from infra.storage import ObjectStore, StorageError
from models.errors import DeviceMemoryError
from processor.announcer import Announcer
from processor.deliveries import attempt, deferral, deferred, first_delivery, job_id, job_type, replayed, suspect
from processor.handlers.base import Handler, Job, MakesOutputs
from processor.interrupted_runs import INTERRUPTED, InterruptedRuns
from processor.liveness import MAX_DEFERRED_SECONDS, Heartbeat, deferral_delay, new_processor_id
from processor.outcomes import Failed, Outcome, SettledElsewhere, Settlement
from processor.outputs import output_lost
from processor.pieces import pieces_for
from processor.retrying import TRANSIENT_ERRORS
from processor.scheduler import PIPELINE_DEPTH, Lane, Scheduler
from processor.settler import Settler, recorded_outcome
from processor.tracking import Tracked

log = structlog.get_logger(__name__)

# A first delivery published longer ago than this (by the stamp of the record it carries) writes its running mark
# before its model starts rather than beside it: a duplicate of a job settled meanwhile, or one the API withdrew,
# is then not run at all. A fresher one starts at once.
MARK_BEFORE_RUN_AFTER_SECONDS = 2.0


class Consumer:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        publisher: Publisher,
        handlers: Mapping[str, Handler],
        disabled: Mapping[str, str],
        max_attempts: int,
        jobs: JobStore,
        store: ObjectStore,
        capabilities: Sequence[str],
        max_interrupted_runs: int,
        pipeline_depth: int = PIPELINE_DEPTH,
        announce: bool = True,
    ) -> None:
        """`announce`: publish job events (JOB_EVENTS_ENABLED); callbacks are announced either way."""
        self._connection = connection
        self.capabilities = tuple(capabilities)
        self._handlers = dict(handlers)
        self._disabled = dict(disabled)
        self._publisher = publisher
        self._store = store
        self._announcer = Announcer(publisher, store, events=announce)
        self.processor = new_processor_id()
        self._heartbeat = Heartbeat(store, self.processor)
        self._settler = Settler(
            publisher, jobs, store, max_attempts, announcer=self._announcer, processor=self.processor
        )
        self._runs = InterruptedRuns(store, max_interrupted_runs)
        self._apart_types = frozenset(name for name, handler in self._handlers.items() if handler.apart)
        self._scheduler = self._new_scheduler(pipeline_depth, apart=False)
        self._apart = self._new_scheduler(pipeline_depth, apart=True)
        self._channels: list[AbstractChannel] = []
        self._consumers: list[tuple[AbstractQueue, str]] = []

    def _new_scheduler(self, depth: int, *, apart: bool) -> Scheduler[AbstractIncomingMessage]:
        """A scheduler for the job types whose handlers run apart from the models (apart), or for the others."""
        lanes = {
            name: Lane(handler.batch_size, handler.pipelined)
            for name, handler in self._handlers.items()
            if handler.apart == apart
        }
        return Scheduler(
            self._process,
            lanes=lanes,
            type_of=job_type,
            priority_of=lambda message: message.priority or 0,
            suspect=suspect,
            depth=depth,
            crashed=self._settler.hand_back,
        )

    def _schedulers(self) -> tuple[Scheduler[AbstractIncomingMessage], ...]:
        return self._scheduler, self._apart

    def _scheduler_of(self, message_type: str) -> Scheduler[AbstractIncomingMessage]:
        return self._apart if message_type in self._apart_types else self._scheduler

    @property
    def idle(self) -> bool:
        """No delivery waiting or being worked on."""
        return all(scheduler.idle for scheduler in self._schedulers())

    async def start(self) -> None:
        """Consume each capability's queue on a channel of its own, with a prefetch sized for its job types (so a
        full index prefetch never holds back an urgent generation), and the unrouted queue beside them."""
        await declare_topology(self._connection)
        self._heartbeat.start()
        for scheduler in self._schedulers():
            scheduler.start()
        self._announcer.start()
        prefetches: dict[str, int] = {}
        for capability in self.capabilities:
            names = [name for name in self._handlers if capability_of(name) == capability]
            prefetch = self._scheduler_of(names[0] if names else "").prefetch_for(names)
            queue = await self._queue_on_new_channel(prefetch, capability)
            prefetches[queue.name] = prefetch
        queue = await self._queue_on_new_channel(1, None)
        prefetches[queue.name] = 1
        log.info(
            "consumer_started",
            processor=self.processor,
            prefetch=prefetches,
            pipeline_depth=self._scheduler.depth,
            types=sorted(self._handlers),
        )

    async def _queue_on_new_channel(self, prefetch: int, capability: str | None) -> AbstractQueue:
        """Start consuming a capability's queue (None: the unrouted queue) on a new channel."""
        channel = await self._connection.channel()
        self._channels.append(channel)
        await channel.set_qos(prefetch_count=prefetch)
        topology = await topology_on(channel)
        queue = topology.unrouted_queue if capability is None else topology.queues[capability]
        self._consumers.append((queue, await queue.consume(self._on_message)))
        return queue

    async def stop(self) -> None:
        """Stop taking messages, let the batches in hand finish, and return the rest to the queue."""
        for queue, tag in self._consumers:
            if not queue.channel.is_closed:
                await queue.cancel(tag)
        self._consumers.clear()
        returned = sum(await asyncio.gather(*(scheduler.stop() for scheduler in self._schedulers())))
        await self._heartbeat.stop()
        self._settler.forget_requeues()
        await self._announcer.stop()
        for channel in self._channels:
            if not channel.is_closed:
                await channel.close()
        log.info("consumer_stopped", returned=returned)

    @property
    def is_running(self) -> bool:
        return (
            all(scheduler.is_running for scheduler in self._schedulers())
            and bool(self._channels)
            and not any(channel.is_closed for channel in self._channels)
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._scheduler_of(job_type(message)).push(message)

    async def _process(self, messages: list[AbstractIncomingMessage]) -> None:
        jobs: list[tuple[AbstractIncomingMessage, Job]] = []
        for message in messages:
            try:
                job = await self._admit(message)
            except Exception as exc:  # reading it failed unforeseen: dead-lettered (replayable), not left unacked
                log.exception("message_not_admitted", message_id=message.message_id)
                text = f"the message could not be read: {exc!r}"
                await self._settled(message, self._settler.refuse(message, "internal_error", text))
                continue
            if job is not None:
                jobs.append((message, job))
        if not jobs:
            return
        handler = self._handlers[jobs[0][1].message_type]
        records: dict[str, Tracked] = {}
        if await self._deferred(handler, jobs, records):
            return
        structlog.contextvars.bind_contextvars(message_ids=[job.message_id for _, job in jobs])
        started = asyncio.get_running_loop().time()
        interrupted = await self._interrupted(jobs)
        try:
            outcomes = await self._run(handler, jobs, records, interrupted)
        except Exception as exc:  # the bookkeeping around the handler failed unforeseen: settled as the handler's crash
            log.exception("batch_failed", job_type=handler.message_type)
            outcomes = [Failed("internal_error", f"{type(exc).__name__}: {exc}")] * len(jobs)
        finally:
            structlog.contextvars.unbind_contextvars("message_ids")
        elapsed = asyncio.get_running_loop().time() - started
        try:
            for (message, job), outcome in zip(jobs, outcomes, strict=True):
                settling = self._settler.settle(message, job, outcome, elapsed, records.get(job.message_id))
                await self._settled(message, settling)
        finally:
            self._heartbeat.ended(tracked.mark for tracked in records.values())
        await asyncio.gather(
            *(self._ended(message, job.message_id, interrupted.get(job.message_id)) for message, job in jobs)
        )

    async def _settled(self, message: AbstractIncomingMessage, settling: Awaitable[None]) -> None:
        """Await one message's settlement; one that fails unforeseen is handed back (on the settler's timer) rather
        than left unacked, and its batch-mates are settled all the same."""
        try:
            await settling
        except Exception:
            log.exception("message_not_settled", message_id=message.message_id)
            self._settler.hand_back([message])

    async def _ended(self, message: AbstractIncomingMessage, message_id: str, interrupted: int | None) -> None:
        """A run that ended here was not interrupted (processor/interrupted_runs.py), acknowledged or not: a counted
        suspect whose message is acknowledged has its count removed; a delivery not acknowledged (its ack lost with
        the connection, or handed back) takes its own part of the count back, as its message comes again.
        `interrupted`: the suspect's runs as counted (None: not counted, or not a suspect)."""
        try:
            if message.processed:
                if interrupted is not None:
                    await self._runs.clear(message_id)
            elif not suspect(message):
                await self._runs.finished(message_id, first=True)
            elif interrupted is not None and interrupted < self._runs.limit:
                await self._runs.finished(message_id, first=False)
        except TRANSIENT_ERRORS as exc:
            log.warning("interrupted_runs_not_updated", message_id=message_id, error=str(exc))

    async def _deferred(
        self, handler: Handler, jobs: Sequence[tuple[AbstractIncomingMessage, Job]], records: dict[str, Tracked]
    ) -> bool:
        """Whether a suspect was deferred, before it is counted, as its job's run lives on (processor/liveness.py):
        its record is not settled and lists the mark of a run whose processor lives, or has been looked at only once;
        none past MAX_DEFERRED_SECONDS deferred in all. The record read for the look is left in `records` for the
        run; a store that does not answer, or refuses, defers nothing (the run reads the record again, and fails as
        before)."""
        message, job = jobs[0]
        if len(jobs) != 1 or not suspect(message) or not _tracked(handler, message):
            return False
        earlier = deferral(message)
        try:
            tracked = await self._settler.tracker.load(job, replayed=replayed(message))
            records[job.message_id] = tracked
            if tracked.settled or (earlier is not None and earlier.seconds >= MAX_DEFERRED_SECONDS):
                return False
            look = await self._heartbeat.look(tracked.record.marks, earlier.seen if earlier is not None else {})
        except (StorageError, *TRANSIENT_ERRORS) as exc:  # down or refusing: the run reads the record again
            log.warning("liveness_not_looked_at", message_id=job.message_id, error=str(exc))
            return False
        if not look.living:
            return False
        delay = deferral_delay()
        log.info(
            "delivered_again_while_running_elsewhere",
            message_id=job.message_id,
            running_on=list(look.living),
            deferred_seconds=earlier.seconds if earlier is not None else 0.0,
            delay_seconds=delay,
        )
        await self._settled(message, self._settler.defer(message, job, deferred(message, look.seen, delay), delay))
        return True

    async def _interrupted(self, jobs: Sequence[tuple[AbstractIncomingMessage, Job]]) -> dict[str, int]:
        """A suspect's runs so far that no processor lived to finish (processor/interrupted_runs.py), this one
        counted unless it is not to run; {} for other deliveries (a suspect runs alone) or when the store is down."""
        message, job = jobs[0]
        if len(jobs) != 1 or not suspect(message):
            return {}
        try:
            interrupted = await self._runs.start(job.message_id)
        except TRANSIENT_ERRORS as exc:
            log.warning("interrupted_runs_not_counted", message_id=job.message_id, error=str(exc))
            return {}
        log.warning("delivered_again_after_interruption", message_id=job.message_id, interrupted_runs=interrupted)
        return {job.message_id: interrupted}

    async def _run(
        self,
        handler: Handler,
        jobs: Sequence[tuple[AbstractIncomingMessage, Job]],
        records: dict[str, Tracked],
        interrupted: Mapping[str, int],
    ) -> list[Settlement]:
        """Outcomes in order. A tracked job whose record is already settled (a redelivery after the outcome was
        recorded, a duplicate that another processor finished, a job the API withdrew) is not run again: its
        recorded outcome stands, unless the output it names is lost (then it runs again, its record left succeeded
        meanwhile). Any other tracked job runs with its running mark written beside it, which it waits for before
        its first lasting side effect (Job.still_wanted): a job the API withdrew meanwhile makes nothing. A first
        delivery that waited in the queue writes its mark before it runs instead, so one settled meanwhile (a
        duplicate, a withdrawal) is not run at all. A suspect interrupted MAX_INTERRUPTED_RUNS times is not run:
        it is dead-lettered (`interrupted`), unless its record is settled."""
        tracker = self._settler.tracker
        outcomes: dict[str, Settlement] = {}
        outputs: dict[str, tuple[str, ...]] = {}
        marks: dict[str, asyncio.Task[bool]] = {}
        late: list[str] = []  # first deliveries that waited in the queue: their marks are awaited before the run
        for message, job in jobs:
            count = interrupted.get(job.message_id, 0)
            refusal = Failed(INTERRUPTED, self._runs.message(count)) if count >= self._runs.limit else None
            if not _tracked(handler, message):
                if refusal is not None:
                    outcomes[job.message_id] = refusal
                continue
            try:
                carried = _carried(message, job)
                tracked = records.get(job.message_id) or carried or await tracker.load(job, replayed=replayed(message))
                records[job.message_id] = tracked
                if carried is not None and _waited(carried):
                    late.append(job.message_id)
                outputs[job.message_id] = _outputs(handler, tracked)
                if outputs[job.message_id] and await self._lost(outputs[job.message_id]):
                    log.warning(
                        "job_output_lost_running_again", message_id=job.message_id, outputs=outputs[job.message_id]
                    )
                    tracked.remaking = True
                elif tracked.settled:
                    outcomes[job.message_id] = recorded_outcome(tracked.record, outputs[job.message_id])
                elif refusal is not None:
                    outcomes[job.message_id] = refusal
                else:
                    marks[job.message_id] = tracker.mark_running(tracked, attempt(message))
                    self._heartbeat.running(tracked.mark)
            except TRANSIENT_ERRORS as exc:
                outcomes[job.message_id] = Failed("storage_unavailable", str(exc), transient=True)
        waiting = [message_id for message_id in late if message_id in marks]
        settled = await asyncio.gather(*(_settled_by_mark(marks[key], records[key], handler) for key in waiting))
        outcomes.update({key: outcome for key, outcome in zip(waiting, settled, strict=True) if outcome is not None})
        to_run = [
            dataclasses.replace(job, marking=marks.get(job.message_id))
            for _, job in jobs
            if job.message_id not in outcomes
        ]
        if to_run:
            try:
                results: Sequence[Outcome] = await handler.handle(to_run)
            except DeviceMemoryError as exc:  # the device was short of memory this time: retried, as for a store down
                log.warning("device_out_of_memory", job_type=handler.message_type, error=str(exc))
                results = [Failed(exc.code, str(exc), transient=True)] * len(to_run)
            except Exception as exc:
                log.exception("handler_crashed", job_type=handler.message_type)
                results = [Failed("internal_error", f"{type(exc).__name__}: {exc}")] * len(to_run)
            for job, outcome in zip(to_run, results, strict=True):
                if isinstance(outcome, SettledElsewhere):  # the running mark found the record settled
                    tracked = records[job.message_id]
                    outcomes[job.message_id] = recorded_outcome(tracked.record, _outputs(handler, tracked))
                else:
                    outcomes[job.message_id] = outcome
        return [outcomes[job.message_id] for _, job in jobs]

    async def _lost(self, outputs: tuple[str, ...]) -> bool:
        return any(await asyncio.gather(*(output_lost(self._store, key) for key in outputs)))

    async def _admit(self, message: AbstractIncomingMessage) -> Job | None:
        """Decode one message; dead-letter it at once if it breaks the contract or its feature is off."""
        message_id, message_type = job_id(message), job_type(message)
        if not message_id:
            await self._settler.refuse(message, "missing_message_id", "the AMQP `message_id` property is required")
            return None
        reason = self._disabled.get(message_type)
        if reason is not None:
            await self._settler.refuse(message, "feature_disabled", reason)
            return None
        try:
            if message_type == BUCKET_EVENT:
                payload: object = parse_bucket_event(message.body)
            else:
                payload = decode_job(message.type, message.content_type, message.body)
        except ContractError as exc:
            await self._settler.refuse(message, exc.code, exc.message)
            return None
        if message_type not in self._handlers:
            await self._settler.refuse(message, "unknown_type", f"no handler for {message_type!r}")
            return None
        return Job(
            message_id=message_id,
            message_type=message_type,
            payload=payload,
            priority=message.priority or 0,
            pieces=pieces_for(message, self._publisher),
            attempt=attempt(message),
        )


def _tracked(handler: Handler, message: AbstractIncomingMessage) -> bool:
    """Whether the job has a record: its handler keeps one always, or its message asks for one."""
    return handler.always_record or bool((message.headers or {}).get(RECORD_HEADER))


def _outputs(handler: Handler, tracked: Tracked) -> tuple[str, ...]:
    """The outputs a succeeded record names, for a handler whose jobs make them; () otherwise, and for a job whose
    output was deleted on purpose (expired, or its client asked): it is not made again."""
    record = tracked.record
    if record.status != "succeeded" or record.output_deleted is not None or not isinstance(handler, MakesOutputs):
        return ()
    return handler.outputs(tracked.record.result or {})


def _waited(carried: Tracked) -> bool:
    """Whether a first delivery's carried record was written (just before its publish) over
    MARK_BEFORE_RUN_AFTER_SECONDS ago: it waited in the queue, long enough for a duplicate or a withdrawal to have
    settled it meanwhile. (Only what it costs depends on this: a job waits for its mark before its first side
    effect in any case.)"""
    try:
        return age_seconds(carried.record.updated_at) > MARK_BEFORE_RUN_AFTER_SECONDS
    except ValueError:
        return True


async def _settled_by_mark(mark: asyncio.Task[bool], tracked: Tracked, handler: Handler) -> Settlement | None:
    """Wait for a late delivery's running mark before its model runs: the record's outcome when the mark found
    it settled (the job is not run at all), a transient failure when the mark could not be written, else None."""
    try:
        if await mark:
            return None
    except TRANSIENT_ERRORS as exc:
        return Failed("storage_unavailable", str(exc), transient=True)
    return recorded_outcome(tracked.record, _outputs(handler, tracked))


def _carried(message: AbstractIncomingMessage, job: Job) -> Tracked | None:
    """The queued record a first delivery carries (the API wrote it just before publishing): not read back."""
    carried = queued_record(message.headers or {}) if first_delivery(message) else None
    if carried is None or carried[0].job_id != job.message_id:
        return None
    return Tracked(*carried)
