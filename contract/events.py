"""Job events: what the ams.events exchange announces when a job ends.

A job that has a record (every job started through the API; upstream jobs that get one) announces its end once
its outcome is durable: a processor publishes the event (persistent, confirmed) before it acknowledges the job's
message, and the API publishes one when it cancels a queued job. The routing key is "<job type>.<status>"
(`image.generate.succeeded`, `voice.generate.failed`), so a queue bound with `#` gets every event, one bound with
`image.generate.*` the ends of generations, one bound with `#.failed` every failure. Delivery is at least once:
a redelivered message, or a cancellation announced by the API and again by the processor that later takes the
message, announces the same end again under the same `event_id`, by which consumers drop duplicates.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import msgspec

from contract.errors import ErrorInfo
from contract.job_types import IMAGE_INDEX
from contract.jobs import FINISHED, JobRecord, is_withdrawn
from infra.broker import Publisher

JOB_FINISHED = "job.finished"
_EVENT_NAMESPACE = uuid.UUID("6c0f4f2e-8f0b-4d55-a7a4-3c1d8e5b9a20")


class JobFinishedV1(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A job ended: succeeded, or failed for good (retries exhausted, refused, cancelled by its client).

    The fields are those of `GET /v1/jobs/{id}`, without links: the result names its output by `key` in the object
    store (R2, or the embedded store), and `GET /v1/jobs/{id}` gives a download URL. `event_id` is the same for
    every announcement of the same end.
    """

    version: Literal[1] = 1
    event_id: str
    job_id: str
    type: str
    status: Literal["succeeded", "failed"]
    created_at: str
    started_at: str | None = None
    finished_at: str
    attempts: int
    params: dict[str, Any]
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None


def has_ended(record: JobRecord) -> bool:
    """Whether the record says the job ended in a way that is announced: finished, and not withdrawn (the API told
    its client the job does not take effect: it never started, as far as anyone outside knows)."""
    return record.status in FINISHED and record.finished_at is not None and not is_withdrawn(record)


def job_finished(record: JobRecord) -> tuple[str, JobFinishedV1]:
    """The routing key and the event announcing a finished record's end."""
    if not has_ended(record) or record.finished_at is None:
        raise ValueError(f"job {record.job_id} has not ended ({record.status})")
    event = JobFinishedV1(
        event_id=str(uuid.uuid5(_EVENT_NAMESPACE, f"{record.job_id}/{record.status}/{record.finished_at}")),
        job_id=record.job_id,
        type=record.type,
        status=record.status,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        attempts=record.attempts,
        params=record.params,
        result=_shown_result(record),
        error=record.error,
    )
    return f"{record.type}.{record.status}", event


# what an image.index job's result (the index's record of the image) holds for the index alone, not shown
_INDEX_ONLY_FIELDS = ("created_us", "thumbnail")


def _shown_result(record: JobRecord) -> dict[str, Any] | None:
    """The result as `GET /v1/jobs/{id}` shows it, without links: an upload's is the image as `GET /v1/images/{id}`
    shows it (the index's own fields left out)."""
    if record.type != IMAGE_INDEX or record.result is None:
        return record.result
    return {name: value for name, value in record.result.items() if name not in _INDEX_ONLY_FIELDS}


async def publish_event(publisher: Publisher, routing_key: str, event: JobFinishedV1) -> None:
    await publisher.announce(
        routing_key=routing_key, body=msgspec.json.encode(event), message_id=event.event_id, message_type=JOB_FINISHED
    )
