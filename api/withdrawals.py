"""Withdrawing, once the object store answers again, the records of refused requests that it did not answer about.

A request writes its job's queued record, then publishes the job's message; when either fails, the client gets a
503 and what was written is taken back at once (api/jobs.py): the record deleted when the message certainly never
left, marked withdrawn when it may still reach its queue. That taking back needs the store. When the store did not
answer, it may hold a write it took without answering: a record that no message will ever run, which a store that
hangs writes when it answers again, and whose client, told 503, retries with a new job (or with its Idempotency-Key,
which finds it). So such a record is owed a withdrawal: this process looks for it every ROUND_SECONDS, one store
call per owed job while the store answers, and deletes it (or marks it withdrawn) conditionally on the version it
read, as long as it is still the queued record the request wrote. One that changed meanwhile is left as it is: a
processor took the job after all, or a request made it its own. A record not there is looked for until the store has
answered for ABSENT_FOR_SECONDS on end with it absent: a write the store took is made by then, or never.

A job with an Idempotency-Key is not owed a withdrawal: it is its key's. The retry the 503 asked for finds its
record, and sends its message if it never started (api/resend.py) or starts it afresh if it was withdrawn; a
withdrawal racing that retry would take back a job the retry had just answered 202 for.

What is owed lives in this process: one stopped meanwhile leaves its owed records queued, as one stopped between a
record's write and its publish does (a retry with the Idempotency-Key sends such a job: api/resend.py; `ams-ops
jobs cancel --updated-before` ends the others).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from contract.jobs import JobRecord, JobStore, withdrawn
from infra.storage import PreconditionFailedError, StorageUnavailableError

log = structlog.get_logger(__name__)

ROUND_SECONDS = 2.0
ABSENT_FOR_SECONDS = 60.0
MAX_OWED = 10_000  # past this many, the oldest owed withdrawal is given up (logged)


@dataclass(slots=True)
class _Owed:
    record: JobRecord  # as the request wrote it (queued)
    reason: str
    remove: bool  # delete it (its message never left), else mark it withdrawn (the message may still arrive)
    absent_since: float | None = None  # when the store, answering, first said there is no such record


class Withdrawals:
    """The withdrawals this API process owes, and the task that makes them while there are any."""

    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs
        self._owed: dict[str, _Owed] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def owe(self, record: JobRecord, reason: str, *, remove: bool) -> None:
        """Withdraw the queued `record` once the store answers: delete it (`remove`: its message never left) or mark
        it withdrawn (its message may still reach its queue, where a processor then makes nothing of it). A record
        with an Idempotency-Key is left to its key's retries (see the module)."""
        if record.idempotency_key is not None:
            return
        if self._closed:  # a request's shielded withdrawal that ended after the server stopped
            log.warning("job_withdrawals_left", job_ids=[record.job_id])
            return
        if len(self._owed) >= MAX_OWED:
            given_up = next(iter(self._owed))
            del self._owed[given_up]
            log.warning("job_withdrawal_given_up", job_id=given_up, owed=MAX_OWED)
        self._owed[record.job_id] = _Owed(record, reason, remove)
        log.warning("job_withdrawal_owed", job_id=record.job_id, remove=remove)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._rounds(), name="job-withdrawals")

    @property
    def owed(self) -> int:
        return len(self._owed)

    async def close(self) -> None:
        """Stop; what is still owed is left (logged)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._owed:
            log.warning("job_withdrawals_left", job_ids=list(self._owed))

    async def _rounds(self) -> None:
        while self._owed:
            await asyncio.sleep(ROUND_SECONDS)
            for job_id, owed in list(self._owed.items()):
                try:
                    done = await self._withdraw(owed)
                except (
                    StorageUnavailableError
                ):  # the next round tries again, and the store must answer a while on end anew
                    for waiting in self._owed.values():
                        waiting.absent_since = None
                    break
                except Exception:  # a store refusing for good (credentials, a policy): given up, once
                    log.exception("job_withdrawal_failed", job_id=job_id)
                    done = True
                if done and self._owed.get(job_id) is owed:
                    del self._owed[job_id]

    async def _withdraw(self, owed: _Owed) -> bool:
        """One look at the owed record; True when nothing more is owed."""
        job_id = owed.record.job_id
        found = await self._jobs.load(job_id)
        if found is None:
            now = time.monotonic()
            owed.absent_since = owed.absent_since if owed.absent_since is not None else now
            return now - owed.absent_since >= ABSENT_FOR_SECONDS
        stored, version = found
        if not _as_written(stored, owed.record):
            return True  # taken by a processor, made its own by a retry, or cancelled: not this request's any more
        try:
            if owed.remove:
                await self._jobs.delete(job_id, if_match=version)
            else:
                await self._jobs.update(withdrawn(stored, owed.reason), version)
        except PreconditionFailedError:
            return False  # written meanwhile: looked at again next round
        log.warning("job_withdrawn_late", job_id=job_id, removed=owed.remove)
        return True


def _as_written(stored: JobRecord, written: JobRecord) -> bool:
    """Whether the stored record is still the queued one a request wrote."""
    return (
        stored.status == "queued"
        and stored.updated_at == written.updated_at
        and stored.created_at == written.created_at
        and not stored.marks
    )
