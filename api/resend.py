"""Sending again the message of a job that never started, when its client retries it with its Idempotency-Key.

A request writes its job's queued record, then publishes the job's message. An API process that stops between
the two (killed, out of memory, its host lost) leaves a record that stays queued with no message behind it:
nothing would run the job, and every retry with its key would find it and answer 202 for it. So a request whose
key finds its job queued and never attempted has the job watched: once its record is RESEND_AFTER_SECONDS old
(past any publish of the request that wrote it) and still the version the request found, the record is stamped
again (a conditional write: of several API processes, one sends) and the message, made from the retried request
(the same job: its parameters were checked), is published carrying it. The request itself is answered at once,
as any retry of an unfinished job.

A job merely waiting in a long queue gets a duplicate message this way, at most one per RESEND_AFTER_SECONDS and
only while its client retries: the second to arrive makes nothing once the job is settled (its running mark
finds the record settled), or, if both are delivered together, runs it once more, converging on the same record
and output. If the publish certainly reached no queue, the stamp is put back, so the next retry sends it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import msgspec
import structlog

from contract.jobs import RESEND_AFTER_SECONDS, JobRecord, JobStore, age_seconds, record_headers, restamped
from contract.messages import MSGPACK, encode
from infra.broker import BrokerUnavailableError, Publisher
from infra.storage import PreconditionFailedError, StorageUnavailableError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Resend:
    """What the message of a job is made of: its type, its payload (from the retried request), its priority."""

    job_type: str
    payload: msgspec.Struct
    priority: int


class Resender:
    """The jobs this API process is watching, one task each, until they are sent again or found taken."""

    def __init__(self, jobs: JobStore, publisher: Publisher) -> None:
        self._jobs = jobs
        self._publisher = publisher
        self._watching: dict[str, asyncio.Task[None]] = {}

    def watch(self, record: JobRecord, version: str, resend: Resend) -> None:
        """Send the job's message again once its record is due, if it is still at `version` (see the module)."""
        job_id = record.job_id
        if job_id in self._watching:
            return
        task = asyncio.create_task(self._when_due(record, version, resend), name=f"resend-{job_id}")
        self._watching[job_id] = task
        task.add_done_callback(lambda _: self._watching.pop(job_id, None))

    async def close(self) -> None:
        """Stop watching (a job not sent yet is sent by the next retry of its request)."""
        tasks = list(self._watching.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _when_due(self, record: JobRecord, version: str, resend: Resend) -> None:
        logger = log.bind(job_id=record.job_id, job_type=resend.job_type)
        try:
            await asyncio.sleep(max(0.0, RESEND_AFTER_SECONDS - _age(record)))
            stamped = restamped(record)
            try:
                stamped_version = await self._jobs.update(stamped, version, durable=False)
            except PreconditionFailedError:
                return  # taken by a processor, withdrawn, or sent again by another API process meanwhile
            try:
                await self._send(stamped, stamped_version, resend)
            except BrokerUnavailableError as exc:
                logger.warning("job_not_sent_again", error=str(exc), unsent=exc.unsent)
                if exc.unsent:  # the record as found, with its old stamp: the next retry sends it at once
                    with contextlib.suppress(PreconditionFailedError):
                        await self._jobs.update(record, stamped_version, durable=False)
                return
            logger.warning("job_sent_again", queued_seconds=round(_age(record), 1))
        except StorageUnavailableError as exc:
            logger.warning("job_not_sent_again", error=str(exc))

    async def _send(self, record: JobRecord, version: str, resend: Resend) -> None:
        await self._publisher.publish(
            message_type=resend.job_type,
            body=encode(resend.payload, MSGPACK),
            message_id=record.job_id,
            content_type=MSGPACK,
            priority=resend.priority,
            headers=record_headers(record, version),
        )


def _age(record: JobRecord) -> float:
    try:
        return age_seconds(record.updated_at)
    except ValueError:  # a stamp that cannot be read: as good as old
        return RESEND_AFTER_SECONDS
