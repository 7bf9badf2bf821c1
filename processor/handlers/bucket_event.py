"""bucket.event: R2 / S3 notifications. New images under WATCH_PREFIXES are indexed in place, deleted objects
leave the index; everything else is acknowledged and logged as skipped."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from contract.bucket_events import BUCKET_EVENT, ObjectEvent
from contract.image_ids import ORIGINALS_PREFIX
from contract.messages import IMAGE_INDEX, ImageIndexV1
from processor.handlers.base import Job
from processor.handlers.image_delete import ImageDeleter
from processor.handlers.image_index import ImageIndexHandler
from processor.outcomes import Failed, Outcome, Succeeded
from processor.retrying import TRANSIENT_ERRORS

log = structlog.get_logger(__name__)

# index failures that mean "this object is not an image we can index": skipped, not dead-lettered
_NOT_INDEXABLE = {"empty_file", "not_an_image", "unsupported_format", "corrupt_image", "too_many_pixels"}


class BucketEventHandler:
    message_type = BUCKET_EVENT
    batch_size = 1
    always_record = False
    reports_running = False

    def __init__(
        self,
        *,
        indexer: ImageIndexHandler,
        deleter: ImageDeleter,
        bucket: str,
        prefixes: Sequence[str],
        max_bytes: int,
    ) -> None:
        self._indexer = indexer
        self._deleter = deleter
        self._bucket = bucket
        self._prefixes = tuple(prefixes)
        self._max_bytes = max_bytes

    async def handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        return [await self._one(job) for job in jobs]

    async def _one(self, job: Job) -> Outcome:
        results: list[dict[str, Any]] = []
        for event in job.payload:
            outcome = await self._event(job, event)
            if isinstance(outcome, Failed):
                return outcome  # the whole notification is retried or dead-lettered; each step is idempotent
            results.append(outcome.result)
        return Succeeded({"events": results})

    def _skip_reason(self, event: ObjectEvent) -> str | None:
        if event.action == "other":
            return f"event {event.name!r} is neither a create nor a delete"
        if event.bucket != self._bucket:
            return f"bucket {event.bucket!r} is not this server's bucket"
        if not event.key.startswith(self._prefixes) or event.key.endswith("/"):
            return f"key is outside WATCH_PREFIXES ({', '.join(self._prefixes)})"
        if event.key.startswith(ORIGINALS_PREFIX):
            return "originals are indexed when they are uploaded"
        if event.action == "created" and event.size is not None and event.size > self._max_bytes:
            return f"object is larger than IMAGE_SEARCH_MAX_BYTES ({event.size} bytes)"
        return None

    async def _event(self, job: Job, event: ObjectEvent) -> Outcome:
        logger = log.bind(message_id=job.message_id, event=event.name, bucket=event.bucket, key=event.key)
        reason = self._skip_reason(event)
        if reason is not None:
            logger.info("bucket_event_skipped", reason=reason)
            return Succeeded({"key": event.key, "event": event.name, "skipped": reason})
        if event.action == "removed":
            try:
                result = await self._deleter.forget_key(event.key)
            except TRANSIENT_ERRORS as exc:
                return Failed("index_unavailable", str(exc), transient=True)
            logger.info("bucket_event_removed", image_id=result["image_id"], was_indexed=result["deleted"])
            return Succeeded({"key": event.key, "event": event.name, "removed": result["deleted"]})
        index_job = Job(
            message_id=job.message_id,
            message_type=IMAGE_INDEX,
            payload=ImageIndexV1(key=event.key, source="bucket-event"),
            priority=job.priority,
        )
        [outcome] = await self._indexer.handle([index_job])
        if isinstance(outcome, Failed) and outcome.code in (*_NOT_INDEXABLE, "object_not_found"):
            logger.info("bucket_event_skipped", reason=outcome.message, code=outcome.code)
            return Succeeded({"key": event.key, "event": event.name, "skipped": outcome.message})
        if isinstance(outcome, Succeeded):
            logger.info("bucket_event_indexed", image_id=outcome.result.get("id"))
            return Succeeded({"key": event.key, "event": event.name, "indexed": outcome.result.get("id")})
        return outcome
