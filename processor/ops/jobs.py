"""Job records for the operator: which jobs are where (queued, running, finished), filtered, one job whole,
cancelling queued ones, and deleting generations' outputs.

They are read from the object store the server writes them to (jobs/<id>.json), one read per record: on R2 a
listing costs a GET per job kept (records are kept JOB_RECORD_TTL_DAYS after they finish). Expired records read
as absent, as they do for the API.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

import msgspec
from aio_pika.abc import AbstractRobustConnection

from contract.announcements import to_announce
from contract.jobs import (
    JobRecord,
    JobStore,
    NoOutputError,
    NotCancellableError,
    age_seconds,
    cancel_queued,
    delete_job_output,
    generated_output,
)
from infra.broker import BROKER_ERRORS, Publisher, connect
from infra.settings import Settings
from infra.storage import ObjectStore, StorageError
from processor.announcer import Announcer
from processor.ops.errors import OperationFailedError
from processor.ops.render import MISSING, table
from processor.ops.stores import opened_store

COLUMNS = ("JOB ID", "TYPE", "STATUS", "CODE", "ATTEMPTS", "CREATED", "UPDATED")


@dataclass(frozen=True, slots=True)
class JobSelection:
    """Records matching every given criterion; within one criterion any of the values matches. `code` is the
    error's code of a failed job, or the last error's of one waiting for a retry."""

    statuses: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    codes: frozenset[str] = frozenset()
    updated_before: dt.datetime | None = None

    def matches(self, record: JobRecord) -> bool:
        if self.statuses and record.status not in self.statuses:
            return False
        if self.types and record.type not in self.types:
            return False
        if self.codes and code_of(record) not in self.codes:
            return False
        if self.updated_before is None:
            return True
        try:
            return age_seconds(record.updated_at, self.updated_before) >= 0
        except ValueError:
            return False


def code_of(record: JobRecord) -> str | None:
    error = record.error or record.last_error
    return error.code if error is not None else None


async def list_jobs(settings: Settings, selection: JobSelection) -> tuple[list[JobRecord], int]:
    """The records matching `selection`, oldest first, and how many records there are in all."""
    matching, total = [], 0
    async with opened_store(settings) as store:
        jobs = JobStore(store, settings.job_record_ttl_days)
        try:
            async for _, record, _ in jobs.stored():
                if jobs.expired(record):
                    continue
                total += 1
                if selection.matches(record):
                    matching.append(record)
        except StorageError as exc:
            raise OperationFailedError(f"cannot read the job records: {exc}") from None
    matching.sort(key=lambda record: (record.created_at, record.job_id))
    return matching, total


async def get_job(settings: Settings, job_id: str) -> JobRecord:
    async with opened_store(settings) as store:
        try:
            record = await JobStore(store, settings.job_record_ttl_days).get(job_id)
        except StorageError as exc:
            raise OperationFailedError(f"cannot read the record of job {job_id!r}: {exc}") from None
    if record is None:
        raise OperationFailedError(f"no job record with id {job_id!r}")
    return record


@dataclass(slots=True)
class CancelReport:
    cancelled: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # why each job could not be cancelled
    owed: int = 0  # cancellations whose events wait in the object store (RabbitMQ unreachable)


async def cancel_jobs(settings: Settings, job_ids: list[str]) -> CancelReport:
    """Cancel these queued jobs (contract/jobs.py cancel_queued), one after another, and announce their ends
    (events when JOB_EVENTS_ENABLED, callbacks of jobs with a callback URL; owed in the store when RabbitMQ cannot
    be reached, for a processor to publish). A job that started meanwhile, or finished, is refused and said why; an
    unknown id stops the run (OperationFailedError)."""
    report = CancelReport()
    async with opened_store(settings) as store:
        jobs = JobStore(store, settings.job_record_ttl_days)
        cancelled: list[JobRecord] = []
        try:
            for job_id in job_ids:
                try:
                    done = await cancel_queued(jobs, job_id)
                except NotCancellableError as exc:
                    report.refused.append(str(exc))
                    continue
                except StorageError as exc:
                    raise OperationFailedError(f"cannot cancel job {job_id!r}: {exc}") from None
                if done is None:
                    raise OperationFailedError(f"no job record with id {job_id!r}")
                (report.already if done.already else report.cancelled).append(job_id)
                if not done.already:
                    cancelled.append(done.record)
        finally:
            announced = [record for record in cancelled if to_announce(record, settings.job_events_enabled)]
            if announced:
                report.owed = await _announce(settings, store, announced)
    return report


def has_output(record: JobRecord) -> bool:
    """A succeeded generation whose output is still there to delete."""
    return generated_output(record) is not None and record.output_deleted is None


@dataclass(slots=True)
class OutputReport:
    deleted: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # why each job has no output to delete


async def delete_outputs(settings: Settings, job_ids: list[str]) -> OutputReport:
    """Delete these jobs' generated outputs (contract/jobs.py delete_job_output), one after another, as DELETE
    /v1/jobs/{id}/output does. A job without one (not finished, failed, no generation) is refused and said why; an
    unknown id stops the run (OperationFailedError)."""
    report = OutputReport()
    async with opened_store(settings) as store:
        jobs = JobStore(store, settings.job_record_ttl_days)
        for job_id in job_ids:
            try:
                done = await delete_job_output(jobs, job_id)
            except NoOutputError as exc:
                report.refused.append(str(exc))
                continue
            except StorageError as exc:
                raise OperationFailedError(f"cannot delete the output of job {job_id!r}: {exc}") from None
            if done is None:
                raise OperationFailedError(f"no job record with id {job_id!r}")
            (report.already if done.already else report.deleted).append(job_id)
    return report


async def _announce(settings: Settings, store: ObjectStore, records: list[JobRecord]) -> int:
    """Announce the cancellations as the API does; how many had to be owed."""
    connection, publisher = await _connected(settings)
    owed = 0
    try:
        announcer = Announcer(publisher, store, events=settings.job_events_enabled)
        for record in records:
            try:
                if not await announcer.announce(record):
                    owed += 1
            except StorageError as exc:
                raise OperationFailedError(f"cannot announce the cancellation of job {record.job_id}: {exc}") from None
    finally:
        if connection is not None:
            await connection.close()
    return owed


def jobs_table(records: list[JobRecord]) -> str:
    return table(
        COLUMNS,
        [
            (
                record.job_id,
                record.type,
                record.status,
                code_of(record) or MISSING,
                str(record.attempts),
                record.created_at,
                record.updated_at,
            )
            for record in records
        ],
    )


def jobs_json(records: list[JobRecord]) -> str:
    return json.dumps(msgspec.to_builtins(records), indent=2, ensure_ascii=False)


def job_json(record: JobRecord) -> str:
    return json.dumps(msgspec.to_builtins(record), indent=2, ensure_ascii=False)


async def _connected(settings: Settings) -> tuple[AbstractRobustConnection | None, Publisher | None]:
    """A connection and a publisher on it; None for what could not be opened (the events are then owed)."""
    try:
        connection = await connect(settings.amqp_url, settings.amqp_connect_timeout_seconds)
    except BROKER_ERRORS:
        return None, None
    try:
        return connection, await Publisher.open(connection)
    except BROKER_ERRORS:
        return connection, None
