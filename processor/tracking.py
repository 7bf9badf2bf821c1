"""Keeping job records in step with what the consumer does (see contract/jobs.py).

Every write is conditional: a new record is created only if none exists, an existing one is replaced only if it
is still the version this processor read (its ETag). When another delivery of the same job (on another
processor) wrote in between, the record is read again and the change applied to that, unless it is finished:
a record only moves forward. The one way back is an operator's replay (`ams-ops dlq replay`), which may run a
failed job again; a succeeded job is never run again, unless the output its record names is lost (a power failure
before the output was flushed, while the message was not yet acked: processor/outputs.py), and a failure of that run
leaves the record succeeded, as does its success when the output was deleted on purpose meanwhile (the client's
DELETE, conditional on the version it read, wins over the remake's, and the remade output is deleted again).

Two deliveries of a job may run at once (a resend, a redelivery after a lost channel): the record lists the running
mark of each (`JobRecord.marks`, oldest first), and a failure takes only its own delivery's mark off. The job goes
back to `queued` (or to `failed`) only when no other mark is left; else it stays `running`, and the delivery still
running settles the record. A mark names the processor that wrote it (`<processor id>.<uuid hex>`; one of the
earlier form, a bare uuid, names none), whose heartbeat tells a redelivery whether that run lives
(processor/liveness.py): one that does is waited for, not run beside it. The record itself is not told: a mark whose
processor died stays listed, so a final failure also takes off the marks older than its own: their deliveries
ended, or are taken for dead as RabbitMQ takes them (it delivered the message again, and its redelivery found them
dead or waited past its bound), and a job is never left `running` for good by a processor that died. The price: a
retry whose record still lists a dead processor's mark waits as `running`, not `queued`, until it runs; and a final
failure of the newer of two deliveries running at once fails the job, whose other run's output is then dropped
(processor/outputs.py, drop_unrecorded). A delivery taken for dead that was not (its mark taken off, its processor
alive) records no failure of its own: the record is another run's by then (a newer delivery's, or that of a replay
or of a request starting the job afresh with its Idempotency-Key), which its late failure must not fail or put back
to `queued`.

The running mark is written beside the work, not before it (`mark_running`): the model starts at once, and the
job waits for the mark only before its first lasting side effect (an output stored, a point written), so a job
the API withdrew meanwhile (a conditional write on the same version) makes nothing. The outcome's write waits for
it too, so the record still moves queued -> running -> finished, and the outcome is durable before the message is
acknowledged: a failure's record is flushed as it is written, a success's after the requester has its answer
(`succeeded`, then `flush`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import structlog

from contract.errors import ErrorInfo
from contract.jobs import FINISHED, JobRecord, JobStore, called_off, now_iso, record_params
from infra.storage import PreconditionFailedError, StorageUnavailableError
from processor.handlers.base import Job
from processor.liveness import new_processor_id
from processor.outcomes import Failed, Succeeded
from processor.retrying import retry_transient

log = structlog.get_logger(__name__)

_CONFLICT_ROUNDS = 5


@dataclass(slots=True)
class Tracked:
    """A job record as this processor last read or wrote it; `etag` None: not stored yet."""

    record: JobRecord
    etag: str | None
    replayed: bool = False  # the delivery is an operator's replay: a failed record (not a called-off one) reopens
    remaking: bool = False  # the record says succeeded but its output was lost: the job runs and is recorded again
    marking: asyncio.Task[bool] | None = field(default=None, repr=False)  # the running mark being written
    mark: str | None = None  # this delivery's running mark, as the record lists it once written (None: none made)
    marked: bool = False  # the mark was written: listed, unless another delivery took it off (taken for dead)

    @property
    def settled(self) -> bool:
        """Finished for good: succeeded (its output not lost, or deleted on purpose since it was found lost: a
        remake's success is then not written, and its output is deleted again), withdrawn by the API or cancelled by
        its client (told it does not run: not even a replay runs it), or failed and not being replayed."""
        if self.record.status == "succeeded":
            return not self.remaking or self.record.output_deleted is not None
        return self.record.status in FINISHED and (not self.replayed or called_off(self.record))


class JobTracker:
    def __init__(self, jobs: JobStore, processor: str | None = None) -> None:
        """`processor`: the id this processor's running marks name (processor/liveness.py; a new one when None)."""
        self._jobs = jobs
        self.processor = processor or new_processor_id()

    async def load(self, job: Job, *, replayed: bool = False) -> Tracked:
        """The job's record, or a new one for a job that arrived without one (e.g. from an upstream system)."""
        found = await retry_transient(lambda: self._jobs.load(job.message_id))
        if found is None:
            return Tracked(JobStore.new(job.message_id, job.message_type, record_params(job.payload)), None, replayed)
        return Tracked(*found, replayed)

    def mark_running(self, tracked: Tracked, attempt: int) -> asyncio.Task[bool]:
        """Start writing the running mark beside the work; the next write of this record waits for it, and so does
        the job before its first lasting side effect (Job.still_wanted). The task's result: True when written,
        False when the stored record turned out settled (withdrawn by the API, or finished by another delivery:
        then `tracked` holds that and nothing was written). The mark, `<processor id>.<uuid hex>`, is added to those
        the record lists."""
        mark = tracked.mark = f"{self.processor}.{uuid.uuid4().hex}"
        tracked.marking = asyncio.create_task(
            self._mark(tracked, _running(attempt, mark)), name=f"running-{tracked.record.job_id}"
        )
        return tracked.marking

    async def _mark(self, tracked: Tracked, change: Callable[[JobRecord], bool]) -> bool:
        tracked.marked = await self._apply(tracked, change, durable=False, background=True)
        return tracked.marked

    async def succeeded(self, tracked: Tracked, outcome: Succeeded, attempt: int) -> bool:
        """Write the succeeded record where readers see it at once, not yet flushed to a local disk: the requester
        is answered in the meantime, and `flush` makes it durable before the ack. (The output it names may not be
        flushed yet either: the settler flushes both before the ack, and a power failure in between leaves the
        message unacked; its redelivery finds the record as it was, or finds the output lost and makes it again.)"""

        def change(record: JobRecord) -> bool:
            stamp = now_iso()
            record.status, record.updated_at, record.finished_at = "succeeded", stamp, stamp
            record.attempts, record.result, record.error, record.marks = attempt, outcome.result, None, []
            return True

        return await self._write(tracked, change, durable=False)

    async def flush(self, tracked: Tracked) -> None:
        """Make the record as stored durable (what `succeeded` wrote, or what another delivery did)."""
        await retry_transient(lambda: self._jobs.flush(tracked.record.job_id))

    async def failed(self, tracked: Tracked, outcome: Failed, attempt: int, *, final: bool) -> bool:
        """Record a failure: final (`failed`), or to be retried (`queued` again). False when it was not recorded: the
        record is settled, or it says succeeded and the job runs again only to remake its lost output (the record
        stays succeeded), or another delivery's running mark is left on it (a duplicate of the job, run at once:
        `_marks_left`). Then only this delivery's mark is taken off, and the job stays `running`: a `queued`
        written under the other run would let the job be cancelled while it runs; the delivery that runs it settles
        the record, or its message comes again should its processor die. Nor is anything written when this
        delivery's mark, once written, is no longer listed: another delivery took it for dead, and the record is
        another run's now (see the module's docstring). The settler settles the message as the record says when it
        is finished (by another delivery: the failure is superseded), else retries or dead-letters it."""
        if tracked.remaking:
            return False
        error = ErrorInfo(code=outcome.code, message=outcome.message)

        def change(record: JobRecord) -> bool:
            if tracked.marked and tracked.mark not in record.marks:
                return False
            stamp = now_iso()
            record.updated_at, record.marks = stamp, _marks_left(record.marks, tracked.mark, final=final)
            if record.marks:
                return True
            record.attempts, record.last_error = attempt, error
            if final:
                record.status, record.finished_at, record.error = "failed", stamp, error
            else:
                record.status = "queued"
            return True

        return await self._write(tracked, change) and not tracked.record.marks

    async def stored(self, job_id: str, *, replayed: bool) -> Tracked | None:
        """The job's record as stored (None: there is none, and none is made)."""
        found = await retry_transient(lambda: self._jobs.load(job_id))
        return None if found is None else Tracked(*found, replayed)

    async def _write(self, tracked: Tracked, change: Callable[[JobRecord], bool], *, durable: bool = True) -> bool:
        """Apply `change` to the record and write it conditionally; on a conflict, read the record again and
        apply the change to that, unless it is settled (then False, nothing written). A change that says there is
        nothing to write (False) writes nothing either."""
        marking, tracked.marking = tracked.marking, None
        if marking is not None:
            with contextlib.suppress(Exception):  # a mark that could not be written changes nothing below
                await marking
        return await self._apply(tracked, change, durable=durable)

    async def _apply(
        self, tracked: Tracked, change: Callable[[JobRecord], bool], *, durable: bool = True, background: bool = False
    ) -> bool:
        for _ in range(_CONFLICT_ROUNDS):
            if tracked.settled:
                return False
            candidate = msgspec.structs.replace(tracked.record)
            if not change(candidate):
                return False
            try:
                if tracked.etag is None:
                    etag = await retry_transient(
                        lambda c=candidate: self._jobs.create(c, durable=durable, background=background)
                    )
                else:
                    etag = await retry_transient(
                        lambda c=candidate, e=tracked.etag: self._jobs.update(
                            c, e, durable=durable, background=background
                        )
                    )
            except PreconditionFailedError:
                log.info("job_record_changed_meanwhile", job_id=candidate.job_id)
                found = await retry_transient(lambda job_id=candidate.job_id: self._jobs.load(job_id))
                if found is None:
                    tracked.etag = None
                else:
                    tracked.record, tracked.etag = found
                continue
            tracked.record, tracked.etag, tracked.replayed, tracked.remaking = candidate, etag, False, False
            return True
        raise StorageUnavailableError(f"the record of job {tracked.record.job_id} kept changing; will retry")


def _marks_left(marks: list[str], mark: str | None, *, final: bool) -> list[str]:
    """The running marks a record keeps when the delivery whose mark is `mark` fails: the others; after a final
    failure only those newer than its own (all older ones go: see the module's docstring), none when its own is not
    listed because it made none or its write failed (a job refused, or interrupted too often, ends; one whose mark was
    written and taken off records nothing: `failed`)."""
    if mark not in marks:
        return [] if final else list(marks)
    at = marks.index(mark)
    return marks[at + 1 :] if final else marks[:at] + marks[at + 1 :]


def _running(attempt: int, mark: str) -> Callable[[JobRecord], bool]:
    def change(record: JobRecord) -> bool:
        stamp = now_iso()
        record.status, record.updated_at, record.attempts = "running", stamp, attempt
        record.started_at = record.started_at or stamp
        record.finished_at, record.error = None, None
        record.marks = [*(listed for listed in record.marks if listed != mark), mark]
        return True

    return change
