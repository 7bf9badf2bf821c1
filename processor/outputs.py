"""Job outputs are created once: the first delivery of a job to store its output wins, and a later one (a
redelivery after a crash, or a duplicate on another processor) keeps that object instead of writing a second.

An output can be stored where every reader sees it before it is flushed to a local disk (durable=False): the
requester is answered sooner, and the settler flushes the output before the message is acked. A power failure
in between can lose the output or leave it empty while the message stays unacked; when it comes again,
`output_lost` says so and the job makes its output again (an empty object is never an output: it is replaced).

Two deliveries of a job may run at once (a resend, a redelivery after a lost channel), both marked running. When
the one that created the output finds the record settled by the other (`drop_unrecorded`), and the record does not
name the output as its live one (the client deleted it meanwhile, or the job failed or was cancelled), it deletes
the object it created: an output deleted on purpose does not come back. So does a delivery remaking a lost output
whose client deleted it meanwhile (its record then says so, and the remake's success is not written).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from contract.jobs import JobRecord, generated_output
from infra.storage import ObjectStore, PreconditionFailedError
from processor.handlers.base import Job
from processor.outcomes import SETTLED_ELSEWHERE, Failed, SettledElsewhere
from processor.retrying import TRANSIENT_ERRORS, retry_transient

log = structlog.get_logger(__name__)

_REPLACE_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class StoredOutput:
    """What is stored under an output's key: `data`, this delivery's bytes or those an earlier delivery stored;
    `etag`: the version this delivery created (None: it found an earlier delivery's)."""

    key: str
    data: bytes
    etag: str | None = None

    @property
    def created(self) -> dict[str, str]:
        """For Succeeded.created: the output's key and version when this delivery created it, else nothing."""
        return {self.key: self.etag} if self.etag is not None else {}


async def store_once(
    store: ObjectStore, key: str, data: bytes, content_type: str, *, durable: bool = True
) -> StoredOutput:
    """Create the object (If-None-Match: *) unless it exists; returns what is stored under the key: these bytes
    (with the version created), or those an earlier delivery of the same job stored. An empty object found there is
    replaced. With durable=False a local store does not flush it to the disk yet (ObjectStore.flush does, before
    the ack)."""
    for _ in range(_REPLACE_ROUNDS):
        try:
            etag = await retry_transient(
                lambda: store.put(key, data, content_type, if_none_match=True, durable=durable)
            )
            return StoredOutput(key, data, etag)
        except PreconditionFailedError:
            existing = await retry_transient(lambda: store.get(key))
        if existing.data:
            log.info("output_already_stored", key=key)
            return StoredOutput(key, existing.data)
        log.warning("empty_output_replaced", key=key)
        try:
            etag = await retry_transient(
                lambda etag=existing.etag: store.put(key, data, content_type, if_match=etag, durable=durable)
            )
            return StoredOutput(key, data, etag)
        except PreconditionFailedError:
            continue  # another delivery wrote it meanwhile: read what it wrote
    return StoredOutput(key, (await retry_transient(lambda: store.get(key))).data)


async def store_output(
    job: Job, store: ObjectStore, key: str, data: bytes, content_type: str
) -> StoredOutput | Failed | SettledElsewhere:
    """A job's generated output stored once (`store_once`, not flushed yet: the settler flushes it before the ack)
    if the job is still wanted (Job.still_wanted); what is stored under the key, or what the job reports instead
    (a storage outage is a transient failure)."""
    try:
        if not await job.still_wanted():
            return SETTLED_ELSEWHERE
        return await store_once(store, key, data, content_type, durable=False)
    except TRANSIENT_ERRORS as exc:
        return Failed("storage_unavailable", str(exc), transient=True)


async def drop_unrecorded(store: ObjectStore, created: Mapping[str, str], record: JobRecord) -> None:
    """Delete the outputs a delivery created (key -> version) that the job's record, settled by another delivery
    (or by its client, for a remake of a lost output), does not name as its live output: the client deleted it (or
    it expired) after the other delivery stored it, or while it was remade, or the job failed or was called off.
    Each delete is conditional on the version created, so a version written since stays. One that fails is logged:
    a repeated DELETE of the output, or the sweep that removes the record, deletes it."""
    live = generated_output(record) if record.output_deleted is None else None
    for key, etag in created.items():
        if key == live:
            continue
        try:
            await retry_transient(lambda key=key, etag=etag: store.delete(key, if_match=etag))
        except PreconditionFailedError:
            continue  # gone, or written again, meanwhile
        except TRANSIENT_ERRORS as exc:
            log.warning("unrecorded_output_not_deleted", key=key, job_id=record.job_id, error=str(exc))
            continue
        log.warning("unrecorded_output_deleted", key=key, job_id=record.job_id, status=record.status)


def keyed_output(result: Mapping[str, Any]) -> tuple[str, ...]:
    """The output of a job whose result names its one object under "key"."""
    key = result.get("key")
    return (key,) if isinstance(key, str) else ()


async def output_lost(store: ObjectStore, key: str) -> bool:
    """Whether a job's output is missing or empty: what a power failure can leave of one not yet flushed."""
    return not await retry_transient(lambda: store.size(key))
