"""Keeping job records in step with what the consumer does (see contract/jobs.py)."""

from __future__ import annotations

import structlog

from contract.jobs import JobRecord, JobStore, now_iso, record_params
from contract.messages import ErrorInfo
from processor.handlers.base import Job
from processor.outcomes import Failed, Succeeded
from processor.retrying import retry_transient

log = structlog.get_logger(__name__)


class JobTracker:
    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs

    async def load(self, job: Job) -> JobRecord:
        """The job's record, or a new one for a job that arrived without one (e.g. from an upstream system)."""
        record = await retry_transient(lambda: self._jobs.get(job.message_id))
        if record is None:
            record = JobStore.new(job.message_id, job.message_type, record_params(job.payload))
        return record

    async def running(self, record: JobRecord, attempt: int) -> None:
        stamp = now_iso()
        record.status, record.updated_at, record.attempts = "running", stamp, attempt
        record.started_at = record.started_at or stamp
        await self._write(record)

    async def succeeded(self, record: JobRecord, outcome: Succeeded, attempt: int) -> None:
        stamp = now_iso()
        record.status, record.updated_at, record.finished_at = "succeeded", stamp, stamp
        record.attempts, record.result, record.error = attempt, outcome.result, None
        await self._write(record)

    async def failed(self, record: JobRecord, outcome: Failed, attempt: int, *, final: bool) -> None:
        stamp = now_iso()
        error = ErrorInfo(code=outcome.code, message=outcome.message)
        record.updated_at, record.attempts, record.last_error = stamp, attempt, error
        if final:
            record.status, record.finished_at, record.error = "failed", stamp, error
        else:
            record.status = "queued"
        await self._write(record)

    async def refused(self, job_id: str, outcome: Failed, attempt: int) -> None:
        """Mark the existing record of a job that was refused before it started (if there is one) as failed."""
        record = await retry_transient(lambda: self._jobs.get(job_id))
        if record is not None:
            await self.failed(record, outcome, attempt, final=True)

    async def _write(self, record: JobRecord) -> None:
        await retry_transient(lambda: self._jobs.put(record))
