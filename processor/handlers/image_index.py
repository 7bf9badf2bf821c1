"""image.index: decode (and make the thumbnail), embed (batched), store the original and the thumbnail, upsert
into Qdrant."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, cast

import msgspec
import structlog

from contract.clock import UniqueClock, iso_from_us
from contract.image_ids import image_id_for_key, original_key, thumbnail_key
from contract.imaging import ImageInfo, InvalidImageError, check_image, decode_image, inspect_image
from contract.messages import IMAGE_INDEX, ImageIndexV1
from contract.thumbnails import THUMBNAIL_CONTENT_TYPE, make_thumbnail, thumbnail_from_pixels, thumbnail_size
from infra.storage import InvalidKeyError, ObjectNotFoundError, ObjectStore, ObjectTooLargeError, StorageError
from infra.vectors import ImageRecord, VectorIndex
from models.clip import ClipEmbedder
from models.clip_inputs import EncodedJpeg
from processor.handlers.base import Job
from processor.outcomes import SETTLED_ELSEWHERE, Failed, Outcome, SettledElsewhere, Succeeded
from processor.retrying import TRANSIENT_ERRORS, retry_transient

log = structlog.get_logger(__name__)

# storage requests at once: originals and thumbnails stored, objects fetched (each pipelined batch's fetches
# share the bound)
_CONCURRENT_PUTS = 8
_CONCURRENT_GETS = 16
# larger JPEGs are draft-decoded by Pillow at the model's size rather than decoded whole on the device
DEVICE_DECODE_MAX_PIXELS = 24_000_000


class ImageInputs(NamedTuple):
    """What a decode worker makes of one image."""

    info: ImageInfo  # what the original is
    inputs: Any  # the image tower's input, or an EncodedJpeg for the device to decode
    # the WebP thumbnail, made or being made (in another decode thread, while the model's input is made and the
    # model embeds the batch); None when thumbnails are not made at index time
    thumbnail: bytes | Future[bytes] | None


Spawn = Callable[[Callable[[], bytes]], "Future[bytes]"]


def run_now(make: Callable[[], bytes]) -> Future[bytes]:
    """A Spawn that makes the thumbnail in the calling thread."""
    done: Future[bytes] = Future()
    try:
        done.set_result(make())
    except Exception as exc:
        done.set_exception(exc)
    return done


def prepare_image(
    embedder: ClipEmbedder, data: bytes, max_pixels: int, thumbnail_side: int | None, spawn: Spawn = run_now
) -> ImageInputs:
    """In a decode thread: what the image is, the model's input made from it, and its thumbnail (longest side
    `thumbnail_side`; none when that is None). For a plain JPEG of a sane size when the embedder decodes JPEGs on its
    device, it is only checked here (decoded at 1/8 scale, which still reads the whole scan: a broken JPEG fails here,
    not the device's decode of the whole batch): the input is the JPEG itself (`EncodedJpeg`: the batch's are decoded
    there together) and its thumbnail is made later from the pixels decoded there (none yet). Anything else is
    decoded by Pillow once, at the size both the model and the thumbnail need, and its thumbnail is made from that
    by `spawn` (e.g. a decode pool's submit)."""
    if embedder.decodes_jpeg:
        info = inspect_image(data, max_pixels)
        if info.plain_jpeg and info.width * info.height <= DEVICE_DECODE_MAX_PIXELS:
            check_image(data, max_pixels)  # a broken JPEG fails here, not the device's decode of the whole batch
            return ImageInputs(info, EncodedJpeg(data), None)
    return pillow_inputs(embedder, data, max_pixels, thumbnail_side, spawn)


def pillow_inputs(
    embedder: ClipEmbedder, data: bytes, max_pixels: int, thumbnail_side: int | None, spawn: Spawn = run_now
) -> ImageInputs:
    """In a decode thread: the image decoded by Pillow once (JPEGs at the smallest scale that keeps both the model's
    input size and the thumbnail's longest side), then its thumbnail started by `spawn` and the model's input made
    beside it; the decoded image is closed once both are done. InvalidImageError says what is wrong with it."""
    decoded = decode_image(data, max_pixels, min_side=embedder.input_size, min_longest=thumbnail_side, keep_alpha=True)
    image = decoded.image
    thumbnail = None if thumbnail_side is None else spawn(partial(make_thumbnail, image, thumbnail_side))
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    try:
        inputs = embedder.prepare(rgb)
    finally:
        if rgb is not image:
            rgb.close()
        if thumbnail is None:
            image.close()
        else:
            thumbnail.add_done_callback(lambda _: image.close())
    return ImageInputs(decoded.info(), inputs, thumbnail)


@dataclass(slots=True)
class _Prepared:
    position: int
    image_id: str
    r2_key: str
    data: bytes | None
    decoded: ImageInfo  # what the original is
    inputs: Any  # the image tower's input (ClipEmbedder.prepare or decode_jpegs), or an EncodedJpeg until decoded
    thumbnail: bytes | asyncio.Future[bytes] | None  # made, or being made in a decode thread
    job: ImageIndexV1
    still_wanted: Callable[[], Awaitable[bool]]  # Job.still_wanted, asked before the first object is stored


class _LookedUp(NamedTuple):
    """What the index held for a batch's ids, asked while the batch was decoded."""

    existing: dict[str, ImageRecord]
    count: int
    upserts_before: int  # the handler's batches that had written their points when the index was asked


class ImageIndexHandler:
    """Decoding, preprocessing and thumbnails run in a pool of IMAGE_DECODE_THREADS threads (Pillow releases the
    GIL), all the batch's images at once, JPEGs at the smallest scale the model and the thumbnail need; the originals
    and thumbnails are stored concurrently, while the model embeds the batch, before the points that list them are
    written. The index is asked what it holds of the batch's images while they are decoded.

    Pipelined: the consumer runs several batches in `handle` at once, so one batch is fetched and decoded while the
    one before is on the model and the one before that is stored. The model takes one batch at a time (first ready,
    first served); room in the index is reserved per batch, so batches side by side never overfill it."""

    message_type = IMAGE_INDEX
    always_record = False
    pipelined = True
    apart = False

    def __init__(
        self,
        *,
        store: ObjectStore,
        index: VectorIndex,
        embedder: ClipEmbedder,
        bucket: str,
        batch_size: int,
        max_pixels: int,
        max_bytes: int,
        max_elements: int,
        clock: UniqueClock,
        thumbnail_side: int | None,
        decode_threads: int = 2,
    ) -> None:
        self._store = store
        self._index = index
        self._embedder = embedder
        self._bucket = bucket
        self.batch_size = batch_size
        self._max_pixels = max_pixels
        self._max_bytes = max_bytes  # the largest object fetched by key (IMAGE_SEARCH_MAX_BYTES)
        self._max_elements = max_elements
        self._clock = clock
        self._thumbnail_side = thumbnail_side
        self._decoders = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="image-decode")
        self._puts = asyncio.Semaphore(_CONCURRENT_PUTS)
        self._gets = asyncio.Semaphore(_CONCURRENT_GETS)
        self._model_turn = asyncio.Lock()  # one batch on the model at a time, first ready first
        self._reserved = 0  # new images of batches in flight, not yet in the index's count
        self._upserts = 0  # batches that have written their points (or tried), so a count taken before is stale

    async def handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        image_ids = [self._image_id(job) for job in jobs]
        results, looked_up = await asyncio.gather(
            self._prepare_all(jobs, image_ids), self._look_up([image_id for image_id in image_ids if image_id])
        )
        outcomes: list[Outcome | None] = [result if isinstance(result, Failed) else None for result in results]
        prepared = [result for result in results if isinstance(result, _Prepared)]
        if prepared:
            for item, outcome in zip(prepared, await self._index_batch(prepared, looked_up), strict=True):
                outcomes[item.position] = outcome
        return cast(list[Outcome], outcomes)

    async def _prepare_all(self, jobs: Sequence[Job], image_ids: list[str | None]) -> list[_Prepared | Failed]:
        results = await asyncio.gather(
            *(
                self._prepare_or_fail(position, job, image_id)
                for position, (job, image_id) in enumerate(zip(jobs, image_ids, strict=True))
            )
        )
        return await self._decode_on_device(list(results))

    async def _look_up(self, image_ids: list[str]) -> _LookedUp | Failed:
        upserts_before = self._upserts
        try:
            existing, count = await asyncio.gather(
                retry_transient(lambda: self._index.get_many(image_ids)), retry_transient(self._index.count)
            )
        except TRANSIENT_ERRORS as exc:
            return Failed("index_unavailable", str(exc), transient=True)
        return _LookedUp(existing, count, upserts_before)

    def _image_id(self, job: Job) -> str | None:
        """The id the job's image is indexed under: given, derived from bucket and key, or the message id (None
        when that is not a UUID)."""
        payload: ImageIndexV1 = job.payload
        if payload.key is not None:
            image_id = payload.image_id or image_id_for_key(self._bucket, payload.key)
        else:
            image_id = payload.image_id or _uuid_or_none(job.message_id)
        return None if image_id is None else str(uuid.UUID(image_id))

    async def _decode_on_device(self, results: list[_Prepared | Failed]) -> list[_Prepared | Failed]:
        """The batch's plain JPEGs decoded on the device in one call (nvJPEG) and scaled there to their thumbnails'
        size, whose WebP encoding starts in the decode threads; one the device's decoder refuses goes to Pillow,
        which decodes it (and makes its thumbnail) or says what is wrong with it."""
        pending = [item for item in results if isinstance(item, _Prepared) and isinstance(item.inputs, EncodedJpeg)]
        if not pending:
            return results
        pixels = await asyncio.to_thread(self._embedder.decode_jpegs, [item.inputs.data for item in pending])
        decoded = [(item, made) for item, made in zip(pending, pixels, strict=True) if made is not None]
        await self._thumbnails_on_device(decoded)
        refused: dict[int, Failed] = {}
        loop = asyncio.get_running_loop()
        for item, made in zip(pending, pixels, strict=True):
            if made is not None:
                item.inputs = made
                continue
            try:
                made_by_pillow = await loop.run_in_executor(
                    self._decoders,
                    pillow_inputs,
                    self._embedder,
                    item.inputs.data,
                    self._max_pixels,
                    self._thumbnail_side,
                )
            except InvalidImageError as exc:
                refused[item.position] = Failed(exc.code, exc.message)
                continue
            item.inputs = made_by_pillow.inputs
            item.thumbnail = _awaitable(made_by_pillow.thumbnail)
        return [refused.get(item.position, item) if isinstance(item, _Prepared) else item for item in results]

    async def _thumbnails_on_device(self, decoded: list[tuple[_Prepared, Any]]) -> None:
        """Scale the images decoded on the device to their thumbnails' size there, then start each one's WebP
        encoding in a decode thread (`item.thumbnail`, awaited when it is stored)."""
        side = self._thumbnail_side
        if side is None or not decoded:
            return
        sizes = [thumbnail_size(item.decoded.width, item.decoded.height, side) for item, _ in decoded]
        small = await asyncio.to_thread(self._embedder.shrink, [pixels for _, pixels in decoded], sizes)
        for (item, _), pixels in zip(decoded, small, strict=True):
            item.thumbnail = _awaitable(self._decoders.submit(thumbnail_from_pixels, pixels))

    async def _prepare_or_fail(self, position: int, job: Job, image_id: str | None) -> _Prepared | Failed:
        try:
            return await self._prepare(position, job, image_id)
        except InvalidImageError as exc:
            return Failed(exc.code, exc.message)
        except ObjectNotFoundError as exc:
            return Failed("object_not_found", str(exc))
        except ObjectTooLargeError as exc:
            return Failed("object_too_large", f"{exc} (IMAGE_SEARCH_MAX_BYTES)")
        except InvalidKeyError as exc:
            return Failed("invalid_key", str(exc))
        except _MissingId as exc:
            return Failed("missing_image_id", str(exc))
        except TRANSIENT_ERRORS as exc:
            return Failed("storage_unavailable", str(exc), transient=True)
        except StorageError as exc:  # refused for good (S3's 403 AccessDenied, say): this image alone fails
            return Failed("object_refused", str(exc))

    async def _prepare(self, position: int, job: Job, image_id: str | None) -> _Prepared:
        """Fetch (by key), decode and make the model's input; `image_id` is `_image_id(job)`."""
        payload: ImageIndexV1 = job.payload
        if image_id is None:
            raise _MissingId(
                f"message_id {job.message_id!r} is not a UUID; give `image_id` in the body or a UUID message_id"
            )
        if payload.key is not None:
            async with self._gets:
                stored = await retry_transient(lambda: self._store.get(payload.key, max_bytes=self._max_bytes))
            data = stored.data
        else:
            data = payload.data or b""
        loop = asyncio.get_running_loop()
        made = await loop.run_in_executor(
            self._decoders,
            prepare_image,
            self._embedder,
            data,
            self._max_pixels,
            self._thumbnail_side,
            self._decoders.submit,
        )
        r2_key = payload.key if payload.key is not None else original_key(image_id, made.info.extension)
        return _Prepared(
            position=position,
            image_id=image_id,
            r2_key=r2_key,
            data=None if payload.key is not None else data,
            decoded=made.info,
            inputs=made.inputs,
            thumbnail=_awaitable(made.thumbnail),
            job=payload,
            still_wanted=job.still_wanted,
        )

    async def _store_objects(self, item: _Prepared, indexed_before: bool) -> Failed | SettledElsewhere | None:
        """The original (unless it was indexed in place) and the thumbnail, side by side under the store's bound,
        if the job is still wanted. Without thumbnails at index time, an image indexed again loses the thumbnail of
        what it was (the API makes the new one when it is first asked for)."""
        try:
            if not await item.still_wanted():
                return SETTLED_ELSEWHERE
        except TRANSIENT_ERRORS as exc:
            return Failed("storage_unavailable", str(exc), transient=True)
        writes = [self._put(item.r2_key, item.data, item.decoded.content_type)] if item.data is not None else []
        if item.thumbnail is not None:
            writes.append(self._put_thumbnail(item.image_id, item.thumbnail))
        elif indexed_before:
            writes.append(self._delete(thumbnail_key(item.image_id)))
        results = await asyncio.gather(*writes, return_exceptions=True)
        for result in results:
            if isinstance(result, TRANSIENT_ERRORS):
                return Failed("storage_unavailable", str(result), transient=True)
            if isinstance(result, InvalidImageError):
                return Failed(result.code, result.message)
            if isinstance(result, StorageError):  # a write refused for good: this image alone fails
                return Failed("storage_refused", str(result))
            if isinstance(result, BaseException):
                raise result
        return None

    async def _put_thumbnail(self, image_id: str, thumbnail: bytes | asyncio.Future[bytes]) -> None:
        data = thumbnail if isinstance(thumbnail, bytes) else await thumbnail
        await self._put(thumbnail_key(image_id), data, THUMBNAIL_CONTENT_TYPE)

    async def _put(self, key: str, data: bytes, content_type: str) -> None:
        async with self._puts:
            await retry_transient(lambda: self._store.put(key, data, content_type))

    async def _delete(self, key: str) -> None:
        async with self._puts:
            await retry_transient(lambda: self._store.delete(key))

    async def _index_batch(self, batch: list[_Prepared], looked_up: _LookedUp | Failed) -> list[Outcome]:
        if isinstance(looked_up, _LookedUp) and self._upserts != looked_up.upserts_before:
            # a batch beside this one has written points since: what the index holds may have changed
            looked_up = await self._look_up([item.image_id for item in batch])
        if isinstance(looked_up, Failed):
            return [looked_up for _ in batch]
        existing = looked_up.existing
        room = self._max_elements - looked_up.count - self._reserved

        outcomes: list[Outcome | None] = [None] * len(batch)
        accepted: list[int] = []
        new = 0
        for position, item in enumerate(batch):
            if item.image_id not in existing and new >= room:
                outcomes[position] = Failed(
                    "index_full",
                    f"the index holds its maximum of {self._max_elements} images (IMAGE_SEARCH_MAX_ELEMENTS)",
                )
                continue
            new += item.image_id not in existing
            accepted.append(position)
        self._reserved += new
        try:
            if accepted:
                await self._embed_and_store(batch, accepted, existing, outcomes)
        finally:
            self._upserts += 1
            self._reserved -= new
        return cast(list[Outcome], outcomes)

    async def _embed_and_store(
        self,
        batch: list[_Prepared],
        accepted: list[int],
        existing: dict[str, ImageRecord],
        outcomes: list[Outcome | None],
    ) -> None:
        """Store the accepted images' originals and thumbnails while they are embedded (once it is the batch's turn
        on the model), then upsert their points; fills `outcomes` in place."""
        storing = asyncio.gather(
            *(self._store_objects(batch[position], batch[position].image_id in existing) for position in accepted)
        )
        try:
            async with self._model_turn:
                vectors = await asyncio.to_thread(self._embedder.embed_prepared, [batch[p].inputs for p in accepted])
        finally:
            stored = await storing

        to_upsert: list[tuple[ImageRecord, list[float]]] = []
        upserted: list[int] = []
        for row, (position, failure) in enumerate(zip(accepted, stored, strict=True)):
            if failure is not None:
                outcomes[position] = failure
                continue
            item = batch[position]
            previous = existing.get(item.image_id)
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
                thumbnail=item.thumbnail is not None,
            )
            to_upsert.append((record, vectors[row].tolist()))
            upserted.append(position)

        if not to_upsert:
            return
        try:
            await retry_transient(lambda: self._index.upsert(to_upsert))
        except TRANSIENT_ERRORS as exc:
            for position in upserted:
                outcomes[position] = Failed("index_unavailable", str(exc), transient=True)
            return
        for position, (record, _) in zip(upserted, to_upsert, strict=True):
            outcomes[position] = Succeeded(msgspec.to_builtins(record))
        log.info("images_indexed", count=len(to_upsert), ids=[record.id for record, _ in to_upsert])


class _MissingId(ValueError):
    """An inline image with neither an image_id nor a UUID message id."""


def _uuid_or_none(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError):
        return None


def _awaitable(thumbnail: bytes | Future[bytes] | None) -> bytes | asyncio.Future[bytes] | None:
    """A thumbnail being made in a decode thread, as something this loop awaits when it stores it."""
    if not isinstance(thumbnail, Future):
        return thumbnail
    made = asyncio.wrap_future(thumbnail)
    made.add_done_callback(_retrieved)  # awaited when stored; not if the image fails before
    return made


def _retrieved(future: asyncio.Future[bytes]) -> None:
    """Mark a thumbnail's failure as seen (it is reported when the thumbnail is awaited, if it ever is)."""
    if not future.cancelled():
        future.exception()
