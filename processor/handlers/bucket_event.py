"""bucket.event: R2 / S3 notifications. New images under WATCH_PREFIXES are indexed in place, deleted objects
leave the index; everything else is acknowledged and logged as skipped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import structlog

from contract.bucket_events import BUCKET_EVENT, ObjectEvent
from contract.image_ids import ORIGINALS_PREFIX, THUMBNAILS_PREFIX
from contract.messages import IMAGE_INDEX, ImageIndexV1
from infra.storage import InvalidKeyError, validate_key
from processor.handlers.base import Job
from processor.handlers.image_delete import ImageDeleter
from processor.handlers.image_index import ImageIndexHandler
from processor.outcomes import Failed, Outcome, Succeeded
from processor.retrying import TRANSIENT_ERRORS

log = structlog.get_logger(__name__)

# index failures that mean "this object is not an image we can index": skipped, not dead-lettered
_NOT_INDEXABLE = {"empty_file", "not_an_image", "unsupported_format", "corrupt_image", "too_many_pixels"}
# nor are objects this server cannot read: gone, too large, or refused to it (S3's 403 AccessDenied, say)
_NOT_READABLE = {"object_not_found", "object_too_large", "object_refused"}


class BatchOrder:
    """Batches side by side, kept in order around removals: a batch that removes starts its work after every
    earlier batch has finished, and a later batch starts after it has (a create never overtakes an earlier removal
    of its key, nor a removal an earlier create)."""

    def __init__(self) -> None:
        self._open: list[tuple[asyncio.Future[None], bool]] = []

    @asynccontextmanager
    async def turn(self, removes: bool) -> AsyncIterator[None]:
        entry = (asyncio.get_running_loop().create_future(), removes)
        earlier = [done for done, removing in self._open if removes or removing]
        self._open.append(entry)
        try:
            if earlier:
                await asyncio.wait(earlier)
            yield
        finally:
            entry[0].set_result(None)
            self._open.remove(entry)


class BucketEventHandler:
    """Bucket events go through the indexer's batch path: the creates of the messages taken together (up to
    IMAGE_SEARCH_BATCH_SIZE messages) are embedded in batches of that size, in order with the removals between
    them. A message succeeds when all its events do; otherwise it is retried or dead-lettered whole (each step is
    idempotent). Pipelined like the indexer, in order around removals (`BatchOrder`)."""

    message_type = BUCKET_EVENT
    always_record = False
    pipelined = True
    apart = False

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
        self.batch_size = indexer.batch_size
        self._order = BatchOrder()

    async def handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        removes = any(event.action == "removed" for job in jobs for event in job.payload)
        async with self._order.turn(removes):
            return await self._handle(jobs)

    async def _handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        results: list[list[Outcome | None]] = [[None] * len(job.payload) for job in jobs]
        pending: list[tuple[int, int, ObjectEvent]] = []  # creates waiting for a batch: (job, event, what)
        for position, job in enumerate(jobs):
            for number, event in enumerate(job.payload):
                reason = self._skip_reason(event)
                if reason is not None:
                    self._log(job, event).info("bucket_event_skipped", reason=reason)
                    results[position][number] = Succeeded({"key": event.key, "event": event.name, "skipped": reason})
                elif event.action == "removed":
                    await self._index_pending(jobs, pending, results)  # a removal comes after the creates before it
                    results[position][number] = await self._remove(job, event)
                else:
                    pending.append((position, number, event))
        await self._index_pending(jobs, pending, results)
        return [_settle(cast(list[Outcome], outcomes)) for outcomes in results]

    async def _index_pending(
        self, jobs: Sequence[Job], pending: list[tuple[int, int, ObjectEvent]], results: list[list[Outcome | None]]
    ) -> None:
        while pending:
            chunk, pending[:] = pending[: self.batch_size], pending[self.batch_size :]
            index_jobs = [
                Job(
                    message_id=jobs[position].message_id,
                    message_type=IMAGE_INDEX,
                    payload=ImageIndexV1(key=event.key, source="bucket-event"),
                    priority=jobs[position].priority,
                )
                for position, _, event in chunk
            ]
            outcomes = await self._indexer.handle(index_jobs)
            for (position, number, event), outcome in zip(chunk, outcomes, strict=True):
                results[position][number] = self._indexed(jobs[position], event, outcome)

    def _indexed(self, job: Job, event: ObjectEvent, outcome: Outcome) -> Outcome:
        logger = self._log(job, event)
        if isinstance(outcome, Failed) and outcome.code in _NOT_INDEXABLE | _NOT_READABLE:
            logger.info("bucket_event_skipped", reason=outcome.message, code=outcome.code)
            return Succeeded({"key": event.key, "event": event.name, "skipped": outcome.message})
        if isinstance(outcome, Succeeded):
            logger.info("bucket_event_indexed", image_id=outcome.result.get("id"))
            return Succeeded({"key": event.key, "event": event.name, "indexed": outcome.result.get("id")})
        return outcome

    async def _remove(self, job: Job, event: ObjectEvent) -> Outcome:
        try:
            result = await self._deleter.forget_key(event.key)
        except TRANSIENT_ERRORS as exc:
            return Failed("index_unavailable", str(exc), transient=True)
        self._log(job, event).info("bucket_event_removed", image_id=result["image_id"], was_indexed=result["deleted"])
        return Succeeded({"key": event.key, "event": event.name, "removed": result["deleted"]})

    @staticmethod
    def _log(job: Job, event: ObjectEvent) -> Any:
        return log.bind(message_id=job.message_id, event=event.name, bucket=event.bucket, key=event.key)

    def _skip_reason(self, event: ObjectEvent) -> str | None:
        if event.action == "other":
            return f"event {event.name!r} is neither a create nor a delete"
        if event.bucket != self._bucket:
            return f"bucket {event.bucket!r} is not this server's bucket"
        if not event.key.startswith(self._prefixes) or event.key.endswith("/"):
            return f"key is outside WATCH_PREFIXES ({', '.join(self._prefixes)})"
        try:
            validate_key(event.key)
        except InvalidKeyError as exc:  # legal in a bucket (a backslash, a '..' segment), not for every store here
            return f"key is not one this server indexes: {exc}"
        if event.key.startswith(ORIGINALS_PREFIX):
            return "originals are indexed when they are uploaded"
        if event.key.startswith(THUMBNAILS_PREFIX):
            return "thumbnails are made by this server, not indexed"
        if event.action == "created" and event.size is not None and event.size > self._max_bytes:
            return f"object is larger than IMAGE_SEARCH_MAX_BYTES ({event.size} bytes)"
        return None


def _settle(outcomes: list[Outcome]) -> Outcome:
    """One message's outcome: its first failure, or success with what happened to each event."""
    failed = next((outcome for outcome in outcomes if isinstance(outcome, Failed)), None)
    if failed is not None:
        return failed
    return Succeeded({"events": [cast(Succeeded, outcome).result for outcome in outcomes]})
