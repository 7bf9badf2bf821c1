"""Telling a run that goes on from one whose processor died, so that a redelivery does not run a job twice at once.

RabbitMQ delivers a message again once the connection its delivery came on is gone: the processor died, or it only
lost its connection (a broker restart, a network cut) and runs the job on. The redelivery does not say which. So
each processor has an id (random, made at start) and names it in the running marks it writes (`<processor
id>.<uuid hex>`, processor/tracking.py); while it has runs with marks in hand it writes a heartbeat,
`processor/alive/<processor id>.json`, listing their marks under a beat number, every HEARTBEAT_SECONDS (at once
when the first of them starts), and it deletes the heartbeat when it stops cleanly.

A suspect (processor/interrupted_runs.py) whose job's record is not settled looks, before it is counted, at the
processors its record's marks name (a mark of the earlier form, a bare uuid, names none). A run lives when its
processor's heartbeat changed (its ETag) between two looks at least two heartbeat periods apart and still lists
its mark; a heartbeat that is missing, unchanged, or no longer lists the mark is a run that ended or died. No
clocks are compared: what keeps two looks apart is a delay queue. A mark of this processor needs no read: its run
lives while it is in hand here. The first look at a processor cannot tell, so the suspect is deferred while any
run its marks name lives or has been looked at only once: a copy goes round a delay queue (the retry queues, at
least two heartbeat periods; no attempt counted) carrying the versions seen (header x-ams-deferral), and the
delivery is acknowledged. A deferred delivery counts nothing and takes nothing back. Its copy, a suspect in turn,
looks again when it comes back: the record settled by the living run (acknowledged without running, as any delivery
that finds its job settled), or every run named dead (counted and run, as a suspect always was), or round again.
Past MAX_DEFERRED_SECONDS deferred in all (the delay queues' times added up, not a clock), a run still
heartbeating (hung) is taken for dead all the same.

A heartbeat the store does not give at a look (a 503, a timeout) cannot be told dead: that round defers, and the next
compares with the version seen before.

The price: a redelivery whose run died runs one delay later (5 s); each round costs a record read, a heartbeat read
per processor named and a publish, and, as a suspect runs alone, waits for the batch in hand on the processor it
reaches; a processor writes its heartbeat every HEARTBEAT_SECONDS while it runs tracked
jobs, and none while idle. A processor whose beats stop for a round though it lives (its event loop held that long,
the store not taking its writes) is taken for dead, and the job runs again beside it, as before there were
heartbeats. The processors' hourly sweep deletes heartbeats not written for HEARTBEAT_KEPT (a processor killed,
or one idle that long: it writes again at its next run).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
import structlog

from contract.jobs import SWEEP_LEEWAY, now_iso
from infra.broker import retry_delay
from infra.storage import (
    ObjectNotFoundError,
    ObjectStore,
    PreconditionFailedError,
    StorageError,
    StorageUnavailableError,
)
from processor.retrying import TRANSIENT_ERRORS

log = structlog.get_logger(__name__)

ALIVE_PREFIX = "processor/alive/"
HEARTBEAT_SECONDS = 2.0
MAX_DEFERRED_SECONDS = 3600.0
HEARTBEAT_KEPT = timedelta(days=1)


class Beat(msgspec.Struct):
    """A heartbeat as written: the processor, its beat number (so every write is a new version), when (for people
    only: no processor compares it with its own clock), and the marks of the runs it has in hand."""

    processor: str
    beat: int
    at: str
    marks: list[str] = msgspec.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Look:
    """What a look at a record's marks found: the processors whose runs live or cannot be told yet (empty: none
    lives), and the heartbeat version seen of each processor read, for the next look."""

    living: tuple[str, ...]
    seen: dict[str, str]


def new_processor_id() -> str:
    return secrets.token_hex(8)


def processor_of(mark: str) -> str | None:
    """The processor a running mark names; None for a mark of the earlier form (a bare uuid)."""
    processor, dot, _ = mark.partition(".")
    return processor if dot and processor else None


def heartbeat_key(processor: str) -> str:
    return f"{ALIVE_PREFIX}{processor}.json"


def deferral_delay() -> int:
    """How long a deferred delivery waits before its next look: the shortest delay queue of two heartbeat periods."""
    return retry_delay(1, 2 * HEARTBEAT_SECONDS)


class Heartbeat:
    """This processor's heartbeat, and its looks at other processors' ones."""

    def __init__(self, store: ObjectStore, processor: str) -> None:
        self._store = store
        self.processor = processor
        self._running: set[str] = set()
        self._beats = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat(), name="processor-heartbeat")
        self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        """A heartbeat that ended other than by stop() (a bug) is logged: this processor's runs are then taken for
        dead by the redeliveries that look at them, as before there were heartbeats."""
        if not task.cancelled() and task is self._task:
            log.error("heartbeat_stopped", processor=self.processor, error=repr(task.exception()))

    async def stop(self) -> None:
        """Stop beating and delete the heartbeat (the runs in hand have ended)."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._beats:
            try:
                await self._store.delete(heartbeat_key(self.processor))
            except (StorageError, *TRANSIENT_ERRORS) as exc:  # left to the hourly sweep
                log.warning("heartbeat_not_deleted", processor=self.processor, error=str(exc))

    def running(self, mark: str) -> None:
        """A run with this mark is in hand: the heartbeat lists it from its next beat on (at once, when it is the
        only one)."""
        if not self._running:
            self._wake.set()
        self._running.add(mark)

    def ended(self, marks: Iterable[str | None]) -> None:
        """These runs are settled (their marks taken off the record, or left for dead)."""
        self._running.difference_update(marks)

    async def _beat(self) -> None:
        while True:
            self._wake.clear()  # before the write: a run starting during it wakes the next beat at once
            if self._running:
                await self._write()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), HEARTBEAT_SECONDS)

    async def _write(self) -> None:
        self._beats += 1
        beat = Beat(self.processor, self._beats, now_iso(), sorted(self._running))
        try:
            await self._store.put(
                heartbeat_key(self.processor),
                msgspec.json.encode(beat),
                "application/json",
                durable=False,
                background=True,
            )
        except (StorageError, *TRANSIENT_ERRORS) as exc:  # down, or refusing: it beats again, and says so each time
            log.warning("heartbeat_not_written", processor=self.processor, error=str(exc))

    async def look(self, marks: Sequence[str], seen: Mapping[str, str]) -> Look:
        """Look at the runs `marks` name, given the heartbeat versions an earlier look saw (`seen`, {} at the first):
        the processors whose runs live (their heartbeat changed since `seen` and lists the mark, or this processor
        has the run in hand), or whose heartbeat was not seen before, or could not be read this time (the store not
        answering: looked at again next round, against the version seen before)."""
        named = {mark: processor_of(mark) for mark in marks}
        others = sorted({processor for processor in named.values() if processor not in (None, self.processor)})
        reads = await asyncio.gather(*(self._read(processor) for processor in others), return_exceptions=True)
        beats: dict[str, tuple[str, Beat] | None] = {}
        unread: set[str] = set()
        for processor, read in zip(others, reads, strict=True):
            if isinstance(read, TRANSIENT_ERRORS):
                log.warning("heartbeat_not_read", processor=processor, error=str(read))
                unread.add(processor)
            elif isinstance(read, BaseException):
                raise read
            else:
                beats[processor] = read
        living: list[str] = []
        for mark, processor in named.items():
            if processor is None or processor in living:
                continue
            if processor == self.processor:
                alive = mark in self._running
            elif processor in unread:
                alive = True
            else:
                found = beats[processor]
                before = seen.get(processor)
                alive = found is not None and (before is None or (before != found[0] and mark in found[1].marks))
            if alive:
                living.append(processor)
        versions = {processor: found[0] for processor, found in beats.items() if found is not None}
        versions.update({processor: seen[processor] for processor in unread if processor in seen})
        return Look(tuple(living), versions)

    async def _read(self, processor: str) -> tuple[str, Beat] | None:
        """A processor's heartbeat and its version; None when there is none, or it cannot be read (a write cut short
        on a local disk, a store refusing the read)."""
        try:
            stored = await self._store.get(heartbeat_key(processor))
        except ObjectNotFoundError:
            return None
        except StorageUnavailableError:
            raise
        except StorageError as exc:  # refused for good: no run can be told alive, as before there were heartbeats
            log.warning("heartbeat_not_read", processor=processor, error=str(exc))
            return None
        try:
            return stored.etag, msgspec.json.decode(stored.data, type=Beat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None


async def sweep_heartbeats(store: ObjectStore, kept: timedelta = HEARTBEAT_KEPT) -> int:
    """Delete the heartbeats last written longer ago than `kept` by the store's listing (SWEEP_LEEWAY allowing for its
    clock); returns how many. Each is deleted at the version read, so one written again meanwhile stays."""
    now = datetime.now(tz=UTC)
    removed = 0
    async for info in store.list(ALIVE_PREFIX):
        if info.modified >= now - kept - SWEEP_LEEWAY:
            continue
        try:
            stored = await store.get(info.key)
            await store.delete(info.key, if_match=stored.etag)
        except (ObjectNotFoundError, PreconditionFailedError):  # removed, or written again, meanwhile
            continue
        removed += 1
    return removed
