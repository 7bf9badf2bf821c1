"""image.index: decode, store the original, embed (batched), upsert into Qdrant."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import msgspec
import structlog

from contract.clock import UniqueClock, iso_from_us
from contract.image_ids import image_id_for_key, original_key
from contract.imaging import DecodedImage, InvalidImageError, decode_image
from contract.messages import IMAGE_INDEX, ImageIndexV1
from infra.storage import InvalidKeyError, ObjectNotFoundError, ObjectStore
from infra.vectors import ImageRecord, VectorIndex
from models.clip import ClipEmbedder
from processor.handlers.base import Job
from processor.outcomes import Failed, Outcome, Succeeded
from processor.retrying import TRANSIENT_ERRORS, retry_transient

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Prepared:
    position: int
    image_id: str
    r2_key: str
    data: bytes | None
    decoded: DecodedImage
    job: ImageIndexV1


class ImageIndexHandler:
    message_type = IMAGE_INDEX
    always_record = False
    reports_running = False

    def __init__(
        self,
        *,
        store: ObjectStore,
        index: VectorIndex,
        embedder: ClipEmbedder,
        bucket: str,
        batch_size: int,
        max_pixels: int,
        max_elements: int,
        clock: UniqueClock,
    ) -> None:
        self._store = store
        self._index = index
        self._embedder = embedder
        self._bucket = bucket
        self.batch_size = batch_size
        self._max_pixels = max_pixels
        self._max_elements = max_elements
        self._clock = clock

    async def handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(jobs)
        prepared: list[_Prepared] = []
        for position, job in enumerate(jobs):
            try:
                prepared.append(await self._prepare(position, job))
            except InvalidImageError as exc:
                outcomes[position] = Failed(exc.code, exc.message)
            except ObjectNotFoundError as exc:
                outcomes[position] = Failed("object_not_found", str(exc))
            except InvalidKeyError as exc:
                outcomes[position] = Failed("invalid_key", str(exc))
            except _MissingId as exc:
                outcomes[position] = Failed("missing_image_id", str(exc))
            except TRANSIENT_ERRORS as exc:
                outcomes[position] = Failed("storage_unavailable", str(exc), transient=True)
        if prepared:
            for item, outcome in zip(prepared, await self._index_batch(prepared), strict=True):
                outcomes[item.position] = outcome
        return cast(list[Outcome], outcomes)

    async def _prepare(self, position: int, job: Job) -> _Prepared:
        payload: ImageIndexV1 = job.payload
        if payload.key is not None:
            stored = await retry_transient(lambda: self._store.get(payload.key))
            data = stored.data
            image_id = payload.image_id or image_id_for_key(self._bucket, payload.key)
        else:
            data = payload.data or b""
            image_id = payload.image_id or _uuid_or_none(job.message_id)
            if image_id is None:
                raise _MissingId(
                    f"message_id {job.message_id!r} is not a UUID; give `image_id` in the body or a UUID message_id"
                )
        decoded = await asyncio.to_thread(decode_image, data, self._max_pixels)
        image_id = str(uuid.UUID(image_id))
        r2_key = payload.key if payload.key is not None else original_key(image_id, decoded.extension)
        return _Prepared(
            position=position,
            image_id=image_id,
            r2_key=r2_key,
            data=None if payload.key is not None else data,
            decoded=decoded,
            job=payload,
        )

    async def _index_batch(self, batch: list[_Prepared]) -> list[Outcome]:
        try:
            existing = await retry_transient(lambda: self._index.get_many([item.image_id for item in batch]))
            room = self._max_elements - await retry_transient(self._index.count)
        except TRANSIENT_ERRORS as exc:
            return [Failed("index_unavailable", str(exc), transient=True) for _ in batch]

        vectors = await asyncio.to_thread(self._embedder.embed_images, [item.decoded.image for item in batch])

        outcomes: list[Outcome] = []
        to_upsert: list[tuple[ImageRecord, list[float]]] = []
        for item, vector in zip(batch, vectors, strict=True):
            previous = existing.get(item.image_id)
            if previous is None and room <= 0:
                outcomes.append(
                    Failed(
                        "index_full",
                        f"the index holds its maximum of {self._max_elements} images (IMAGE_SEARCH_MAX_ELEMENTS)",
                    )
                )
                continue
            if item.data is not None:
                try:
                    data, key, content_type = item.data, item.r2_key, item.decoded.content_type
                    await retry_transient(lambda d=data, k=key, c=content_type: self._store.put(k, d, c))
                except TRANSIENT_ERRORS as exc:
                    outcomes.append(Failed("storage_unavailable", str(exc), transient=True))
                    continue
            created_us = previous.created_us if previous is not None else self._clock.now_us()
            record = ImageRecord(
                id=item.image_id,
                r2_key=item.r2_key,
                content_type=item.decoded.content_type,
                size=item.decoded.size,
                width=item.decoded.width,
                height=item.decoded.height,
                created_at=iso_from_us(created_us),
                created_us=created_us,
                source=item.job.source,
                filename=item.job.filename,
            )
            if previous is None:
                room -= 1
            to_upsert.append((record, vector.tolist()))
            outcomes.append(Succeeded(msgspec.to_builtins(record)))

        if to_upsert:
            try:
                await retry_transient(lambda: self._index.upsert(to_upsert))
            except TRANSIENT_ERRORS as exc:
                failed = Failed("index_unavailable", str(exc), transient=True)
                return [failed if isinstance(outcome, Succeeded) else outcome for outcome in outcomes]
            log.info("images_indexed", count=len(to_upsert), ids=[record.id for record, _ in to_upsert])
        return outcomes


class _MissingId(ValueError):
    """An inline image with neither an image_id nor a UUID message id."""


def _uuid_or_none(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError):
        return None
