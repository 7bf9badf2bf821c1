"""Counting the runs of a message that no processor lived to finish, so that a message that kills processors (out of
memory, a crash in native code, a fatal device error) is dead-lettered after MAX_INTERRUPTED_RUNS instead of
stopping every processor that takes it, one after the other, for ever.

RabbitMQ marks a delivery `redelivered` when an earlier delivery of the message was not acknowledged: its processor
died, lost its connection, or handed back what it had prefetched when it stopped. Such a delivery is a suspect (as
is the deferred copy of one, below): it runs alone, with nothing beside it (processor/scheduler.py), so that if it
kills this processor too, nothing else goes down with it, and its count is raised in the object store before it
runs (`processor/runs/<sha256 of the message id>.json`, so every processor of a fleet sees it). The first delivery
is never counted (it may have died with the message, or only held it), so a suspect's interrupted runs are its
stored count plus one, and one that reaches MAX_INTERRUPTED_RUNS is dead-lettered without running (code
`interrupted`); an operator's replay (`ams-ops dlq replay`) runs it again once the cause is fixed.

A run that ends on a processor that lives on was not interrupted, whether or not its acknowledgement reached RabbitMQ
(a broker restart or a lost connection during a long job loses it, and the message comes again): once its message
is acknowledged its count is removed; when it is not, the run takes its own part of the count back (`finished`): a
suspect the run it added, a first delivery the one it is counted as without a write, down to -1 (then the next
suspect counts none). A run still going on a processor that lost its connection has not ended either, and its
processor's heartbeat says so (processor/liveness.py): before it is counted, a suspect of a tracked job whose
record lists the mark of a run that lives, or that it cannot tell yet, is deferred (sent round a delay queue, no
attempt counted) and counts nothing, takes nothing back; it comes again until that run has ended (its record
settled: acknowledged without running) or its processor is found dead (then counted and run). A deferred copy
that is counted is a suspect like any other. What a heartbeat cannot tell still counts as before: an untracked job
(no record, no marks), a run whose marks are of the earlier form, a run whose mark or first heartbeat was not yet
written when its connection went, a lost output's remake (it writes no mark), a processor whose heartbeat stalled
for a round though it lives, a run deferred over MAX_DEFERRED_SECONDS. Should MAX_INTERRUPTED_RUNS such runs go on
at once, the next delivery is refused, and its final failure takes their marks off (processor/tracking.py): the job
ends failed `interrupted`, as the client is told everywhere, and a run that ends later finds it so and drops its
output.

A count can be left behind: a take-back lands after another delivery's acknowledgement removed the count (a first
delivery's -1), or a removal the store did not take. Nothing reads it unless the message comes again, so the
processors' hourly sweep deletes a count last written longer ago than job records are kept (JOB_RECORD_TTL_DAYS):
a message whose runs stop processors comes again within moments, not days.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog

from contract.jobs import SWEEP_LEEWAY, age_seconds, now_iso
from infra.storage import ObjectNotFoundError, ObjectStore, PreconditionFailedError

log = structlog.get_logger(__name__)

RUNS_PREFIX = "processor/runs/"
INTERRUPTED = "interrupted"
_CONFLICT_ROUNDS = 5
_FIRST_FINISHED = -1  # the stored count once a first delivery ended unacknowledged, before any suspect counted


def runs_key(message_id: str) -> str:
    return f"{RUNS_PREFIX}{hashlib.sha256(message_id.encode()).hexdigest()}.json"


class InterruptedRuns:
    def __init__(self, store: ObjectStore, limit: int) -> None:
        self._store = store
        self.limit = limit

    async def start(self, message_id: str) -> int:
        """Count a suspect's run before it starts; returns its interrupted runs so far. At `limit` or more nothing
        is written: the message is not to run again."""
        interrupted = 0

        def counted(runs: int | None) -> int | None:
            nonlocal interrupted
            interrupted = (runs or 0) + 1
            return None if interrupted >= self.limit else interrupted

        await self._change(message_id, counted)
        return interrupted

    async def finished(self, message_id: str, *, first: bool) -> None:
        """A run of the message ended on this processor, which lived, but its acknowledgement did not reach RabbitMQ
        (the connection was lost, or the delivery was handed back): the message comes again, and this run is not to
        count as interrupted. A suspect takes back the run it counted (nothing when the count is gone: another
        delivery was acknowledged); a first delivery, counted as one without a write, takes the count one below
        what is stored, down to -1."""

        def taken_back(runs: int | None) -> int | None:
            if runs is None and not first:
                return None
            return max((runs or 0) - 1, _FIRST_FINISHED)

        await self._change(message_id, taken_back)

    async def clear(self, message_id: str) -> None:
        """The message is acknowledged: forget its count. The delete is conditional on the count read, so that the
        end of another delivery of it (whose ack was lost) taking back its run meanwhile is not written after it."""
        key = runs_key(message_id)
        for _ in range(_CONFLICT_ROUNDS):
            try:
                stored = await self._store.get(key)
                await self._store.delete(key, if_match=stored.etag)
            except ObjectNotFoundError:
                return
            except PreconditionFailedError:
                continue
            return

    async def sweep(self, kept: timedelta) -> int:
        """Delete the counts last written longer ago than `kept`; returns how many. Only those the listing says are
        that old (SWEEP_LEEWAY allowing for the store's clock) are read, and each is deleted only if the time written
        in it is that old too (one without it, of an earlier version, by the listing alone), at the version read: a
        count written again meanwhile stays."""
        now = datetime.now(tz=UTC)
        removed = 0
        async for info in self._store.list(RUNS_PREFIX):
            if info.modified >= now - kept + SWEEP_LEEWAY:
                continue
            try:
                stored = await self._store.get(info.key)
                if not _written_before(stored.data, now - kept):
                    continue
                await self._store.delete(info.key, if_match=stored.etag)
            except (ObjectNotFoundError, PreconditionFailedError):  # removed, or written again, meanwhile
                continue
            removed += 1
        return removed

    def message(self, interrupted: int) -> str:
        return (
            f"a processor stopped while running this message {interrupted} times (killed, out of memory, or a crash "
            f"in native code; MAX_INTERRUPTED_RUNS={self.limit}): it was dead-lettered so that it stops no more "
            "processors; `ams-ops dlq replay` runs it again once the cause is fixed"
        )

    async def _change(self, message_id: str, change: Callable[[int | None], int | None]) -> None:
        """Write `change` of the stored count (None: there is none) conditionally on the count read, again on a
        conflict; a change to None writes nothing."""
        key = runs_key(message_id)
        for _ in range(_CONFLICT_ROUNDS):
            try:
                stored = await self._store.get(key)
            except ObjectNotFoundError:
                runs, etag = None, None
            else:
                runs, etag = _runs(stored.data), stored.etag
            changed = change(runs)
            if changed is None:
                return
            body = json.dumps({"message_id": message_id, "runs": changed, "at": now_iso()}).encode()
            try:
                await self._store.put(key, body, "application/json", if_none_match=etag is None, if_match=etag)
            except PreconditionFailedError:
                continue
            return


def _runs(data: bytes) -> int:
    """The stored count; one that cannot be read (a write a power failure cut short) counts as none."""
    try:
        return max(_FIRST_FINISHED, int(json.loads(data)["runs"]))
    except (ValueError, KeyError, TypeError):
        return 0


def _written_before(data: bytes, moment: datetime) -> bool:
    """Whether the time a count says it was written is before `moment` (a count that says none, or cannot be read,
    counts as written then)."""
    try:
        at = json.loads(data)["at"]
    except (ValueError, KeyError, TypeError):
        return True
    try:
        return not isinstance(at, str) or age_seconds(at, moment) > 0
    except ValueError:
        return True
