"""image.delete: remove an image's point and thumbnail (and, by id, its stored original), as DELETE /v1/images/{id}
does."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import structlog

from contract.image_ids import image_id_for_key, thumbnail_key
from contract.messages import IMAGE_DELETE, ImageDeleteV1
from infra.storage import ObjectStore
from infra.vectors import VectorIndex, VectorIndexUnavailableError
from processor.handlers.base import Job
from processor.outcomes import SETTLED_ELSEWHERE, Failed, Outcome, Succeeded
from processor.retrying import TRANSIENT_ERRORS, retry_transient

log = structlog.get_logger(__name__)


class ImageDeleter:
    """Removes images from the index; shared by image.delete messages and bucket delete events."""

    def __init__(self, *, store: ObjectStore, index: VectorIndex, bucket: str) -> None:
        self._store = store
        self._index = index
        self._bucket = bucket

    async def delete_by_id(self, image_id: str) -> dict[str, object]:
        """The original and the thumbnail first, then the point, so a failure part-way is finished by the retry."""
        image_id = str(uuid.UUID(image_id))
        record = await retry_transient(lambda: self._index.get(image_id))
        if record is None:
            return {"image_id": image_id, "deleted": False}
        await retry_transient(lambda: self._store.delete(record.r2_key))
        await retry_transient(lambda: self._store.delete(thumbnail_key(image_id)))
        await retry_transient(lambda: self._index.delete(image_id))
        return {"image_id": image_id, "deleted": True, "r2_key": record.r2_key}

    async def forget_key(self, key: str) -> dict[str, object]:
        """Remove the thumbnail and the point of an object indexed in place (the thumbnail first, so a failure
        part-way is finished by the retry, and whether or not a point is left); the object is not touched."""
        image_id = image_id_for_key(self._bucket, key)
        existed = await retry_transient(lambda: self._index.get(image_id)) is not None
        await retry_transient(lambda: self._store.delete(thumbnail_key(image_id)))
        if existed:
            await retry_transient(lambda: self._index.delete(image_id))
        return {"image_id": image_id, "deleted": existed, "key": key}


class ImageDeleteHandler:
    message_type = IMAGE_DELETE
    batch_size = 1
    always_record = False
    pipelined = False
    apart = False

    def __init__(self, deleter: ImageDeleter) -> None:
        self._deleter = deleter

    async def handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        return [await self._one(job) for job in jobs]

    async def _one(self, job: Job) -> Outcome:
        payload: ImageDeleteV1 = job.payload
        try:
            if not await job.still_wanted():
                return SETTLED_ELSEWHERE
            if payload.image_id is not None:
                result = await self._deleter.delete_by_id(payload.image_id)
            else:
                result = await self._deleter.forget_key(payload.key or "")
        except TRANSIENT_ERRORS as exc:
            code = "index_unavailable" if isinstance(exc, VectorIndexUnavailableError) else "storage_unavailable"
            return Failed(code, str(exc), transient=True)
        log.info("image_deleted" if result["deleted"] else "image_delete_nothing_to_do", **result)
        return Succeeded(result)
