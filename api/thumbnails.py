"""An image's thumbnail for the API: the one the indexer stored, or, for an image indexed before thumbnails
existed, one made now from the original (written only if still absent, so requests side by side agree)."""

from __future__ import annotations

import asyncio

import structlog

from api.errors import ApiError
from contract.image_ids import thumbnail_key
from contract.thumbnails import THUMBNAIL_CONTENT_TYPE, thumbnail_from_bytes
from infra.settings import Settings
from infra.storage import ObjectNotFoundError, ObjectStore, PreconditionFailedError
from infra.vectors import ImageRecord

log = structlog.get_logger(__name__)

# thumbnails made at once by this process: each holds an original (up to IMAGE_SEARCH_MAX_BYTES) and a decode
MAKERS_AT_ONCE = 4


class Thumbnails:
    """Finds an image's thumbnail, making the missing ones (a few at a time)."""

    def __init__(self, store: ObjectStore, settings: Settings) -> None:
        self._store = store
        self._max_pixels = settings.image_search_max_pixels
        self._max_side = settings.thumbnail_max_side
        self._turns = asyncio.Semaphore(MAKERS_AT_ONCE)

    async def key(self, record: ImageRecord) -> tuple[str, bool]:
        """The thumbnail's key, and whether this call made it. A record the indexer flagged has its thumbnail;
        another is looked for, then made from the original: ApiError 404 `original_not_found` when the original
        is gone, InvalidImageError (422) when it is no longer an image this server can read."""
        key = thumbnail_key(record.id)
        if record.thumbnail or await self._store.exists(key):
            return key, False
        async with self._turns:
            if await self._store.exists(key):  # made by a request that held the turn before this one
                return key, False
            try:
                original = await self._store.get(record.r2_key)
            except ObjectNotFoundError:
                raise _original_gone(record) from None
            data = await asyncio.to_thread(thumbnail_from_bytes, original.data, self._max_pixels, self._max_side)
        try:
            await self._store.put(key, data, THUMBNAIL_CONTENT_TYPE, if_none_match=True)
        except PreconditionFailedError:
            return key, False  # another process made it meanwhile
        if not await self._store.exists(record.r2_key):
            # the image was deleted while its thumbnail was made: a delete removes the original before the
            # thumbnail, so one written after the delete's removal of it would be left behind for good
            await self._store.delete(key)
            raise _original_gone(record)
        log.info("thumbnail_made", image_id=record.id, bytes=len(data))
        return key, True


def _original_gone(record: ImageRecord) -> ApiError:
    return ApiError(
        404,
        "original_not_found",
        f"image {record.id} is indexed but its original {record.r2_key!r} is gone from the store, so no thumbnail "
        "can be made; delete the image, or put the original back",
    )
