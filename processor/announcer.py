"""Announcing job ends (contract/announcements.py: the event on ams.events, the callback of a job with a callback URL)
without making a job's acknowledgement wait for RabbitMQ.

An end is announced (each message confirmed) before the job's message is acked. When RabbitMQ does not take it (down, or
blocking publishers under a disk or memory alarm, which it does to every connection that publishes), the event is
owed: stored in the object store (`events/owed/<event id>.json`, durable) and the job acked as usual, so jobs keep
being settled through an alarm. Owed events are published as soon as RabbitMQ takes messages again (tried every
RETRY_SECONDS), then deleted; a processor also looks for those that others left (a stopped processor, an operator's
cancellation made without RabbitMQ) at start-up and every SWEEP_SECONDS. Only when the store
refuses too does the settler hand the delivery back (its redelivery announces the end then). An event may so be
published twice (owed by two deliveries, or published and then its deletion failed): always under one event id.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import structlog

from contract import metrics
from contract.announcements import announce
from contract.events import JobFinishedV1, job_finished
from contract.jobs import JobRecord
from infra.broker import BrokerUnavailableError, Publisher
from infra.storage import ObjectNotFoundError, ObjectStore
from processor.retrying import TRANSIENT_ERRORS, retry_transient

log = structlog.get_logger(__name__)

OWED_PREFIX = "events/owed/"
RETRY_SECONDS = 2.0
# how often a processor looks for events owed by others (a stopped processor, an operator's cancellation made
# while RabbitMQ was unreachable) when it owes none itself
SWEEP_SECONDS = 300.0


class OwedEvent(msgspec.Struct, kw_only=True):
    """An end owed: its event (published when `events`) and its callback (when `callback_url`)."""

    routing_key: str
    event: JobFinishedV1
    events: bool = True
    callback_url: str | None = None


class Announcer:
    """Announces ends through `publisher`, or owes them (None: RabbitMQ unreachable, as for an operator's command
    that could not connect). `events`: publish job events (JOB_EVENTS_ENABLED); callbacks are announced either
    way."""

    def __init__(
        self,
        publisher: Publisher | None,
        store: ObjectStore,
        *,
        events: bool = True,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self._publisher = publisher
        self._store = store
        self.events = events
        self._retry_seconds = retry_seconds
        self._owed = asyncio.Event()  # set while owed events may be waiting (and at start-up: a first look)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._owed.set()
        self._task = asyncio.create_task(self._publish_owed_when_possible(), name="owed-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def announce(self, record: JobRecord) -> bool:
        """Announce the end of a finished record (True), or owe it when RabbitMQ does not take it (False); raises the
        store's error when it cannot be owed either."""
        routing_key, event = job_finished(record)
        owed = OwedEvent(routing_key=routing_key, event=event, events=self.events, callback_url=record.callback_url)
        why = "not connected to RabbitMQ"
        if self._publisher is not None:
            try:
                await _announce(self._publisher, owed)
                metrics.job_events("published")
                return True
            except BrokerUnavailableError as exc:
                why = str(exc)
        body = msgspec.json.encode(owed)
        await retry_transient(lambda: self._store.put(_owed_key(event.event_id), body, "application/json"))
        self._owed.set()
        metrics.job_events("owed")
        log.warning("job_event_owed", job_id=record.job_id, event_id=event.event_id, error=why)
        return False

    async def _publish_owed_when_possible(self) -> None:
        waiting = False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SWEEP_SECONDS):
                    await self._owed.wait()
            self._owed.clear()  # an event owed from here on is seen by the next round
            try:
                published = await self.publish_owed()
            except (BrokerUnavailableError, *TRANSIENT_ERRORS) as exc:
                self._owed.set()
                if not waiting:  # said once per stretch, not every few seconds through a long outage
                    log.warning("owed_job_events_waiting", error=str(exc))
                waiting = True
                await asyncio.sleep(self._retry_seconds)
                continue
            except Exception:  # unforeseen: logged, and tried again, so owed events are never left for good
                self._owed.set()
                log.exception("owed_job_events_failed")
                await asyncio.sleep(self._retry_seconds)
                continue
            waiting = False
            if published:
                log.info("owed_job_events_published", count=published)

    async def publish_owed(self) -> int:
        """Publish every owed event in the store (with events off, only owed callbacks: the rest wait for a processor
        with events on), deleting each once RabbitMQ confirmed it; how many. Raises BrokerUnavailableError (or the
        store's error) at the first one that cannot be published: the rest wait."""
        if self._publisher is None:
            raise BrokerUnavailableError("not connected to RabbitMQ")
        published = 0
        async for info in self._store.list(OWED_PREFIX):
            try:
                stored = await self._store.get(info.key)
            except ObjectNotFoundError:  # published by another processor since it was listed
                continue
            try:
                owed = msgspec.json.decode(stored.data, type=OwedEvent)
            except msgspec.DecodeError:  # not one of ours (owed events are written whole): left as it is
                log.warning("owed_job_event_unreadable", key=info.key)
                continue
            if owed.events and not self.events:  # left for a processor with events on (JOB_EVENTS_ENABLED)
                continue
            await _announce(self._publisher, owed)
            metrics.job_events("published_late")
            await self._store.delete(info.key)
            published += 1
        return published


async def _announce(publisher: Publisher, owed: OwedEvent) -> None:
    await announce(publisher, owed.routing_key, owed.event, events=owed.events, callback_url=owed.callback_url)


def _owed_key(event_id: str) -> str:
    return f"{OWED_PREFIX}{event_id}.json"
