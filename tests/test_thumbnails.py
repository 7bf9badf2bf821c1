"""Thumbnails: made from the decoded image (size, orientation, transparency, never upscaled, JPEGs draft-decoded),
stored by the indexer before the point (also for images indexed in place), never indexed themselves when a bucket
event names one, and removed with their image. Real store (local files), the embedded index and the tiny CLIP."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image

from contract.bucket_events import ObjectEvent
from contract.clock import UniqueClock
from contract.image_ids import image_id_for_key, thumbnail_key
from contract.imaging import check_image, decode_image, inspect_image
from contract.messages import IMAGE_DELETE, IMAGE_INDEX, ImageDeleteV1, ImageIndexV1
from contract.thumbnails import make_thumbnail, thumbnail_from_bytes
from infra.startup import open_image_index
from infra.storage import StorageUnavailableError
from infra.storage.factory import open_store
from models.clip import ClipEmbedder
from processor.handlers.base import Job
from processor.handlers.bucket_event import BucketEventHandler
from processor.handlers.image_delete import ImageDeleteHandler, ImageDeleter
from processor.handlers.image_index import ImageIndexHandler
from processor.outcomes import Failed, Succeeded
from tests.support.images import drawing, encoded, oriented_jpeg

MAX_PIXELS = 50_000_000
SIDE = 384
BUCKET = "test"


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1024, 768), (384, 288)), ((300, 1200), (96, 384)), ((200, 150), (200, 150)), ((5000, 3), (384, 1))],
    ids=["landscape", "portrait", "small-stays", "sliver"],
)
def test_the_longest_side_is_the_max_side_and_nothing_is_upscaled(size, expected):
    made = opened(make_thumbnail(drawing(1, size), SIDE))
    assert (made.format, made.mode, made.size) == ("WEBP", "RGB", expected)


def test_exif_orientation_is_applied_and_transparency_kept():
    assert opened(thumbnail_from_bytes(oriented_jpeg(2, (1024, 768), 6), MAX_PIXELS, SIDE)).size == (288, 384)
    clear = Image.new("RGBA", (800, 400), (255, 0, 0, 0))
    clear.paste((0, 0, 255, 255), (0, 0, 400, 400))
    buffer = io.BytesIO()
    clear.save(buffer, format="PNG")
    made = opened(thumbnail_from_bytes(buffer.getvalue(), MAX_PIXELS, SIDE))
    assert (made.mode, made.size) == ("RGBA", (384, 192))
    assert made.getpixel((300, 100))[3] == 0 and made.getpixel((50, 100))[3] == 255


@pytest.mark.parametrize("orientation", range(1, 9))
def test_width_and_height_are_the_displayed_size(orientation):
    """An image's width and height are those it is shown at, EXIF orientation applied, as its thumbnail is: a JPEG
    stored 200x100 and turned by its orientation (5 to 8) is 100x200 (they were the stored raster's)."""
    data = oriented_jpeg(5, (200, 100), orientation)
    shown = (100, 200) if orientation >= 5 else (200, 100)
    decoded = decode_image(data, MAX_PIXELS)
    assert decoded.image.size == (decoded.width, decoded.height) == shown
    drafted = decode_image(data, MAX_PIXELS, min_side=16)
    assert (drafted.width, drafted.height) == shown
    for info in (inspect_image(data, MAX_PIXELS), check_image(data, MAX_PIXELS), decoded.info()):
        assert (info.width, info.height) == shown
    assert opened(thumbnail_from_bytes(data, MAX_PIXELS, SIDE)).size == shown


def test_a_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_longest_side():
    photo = encoded(3, "JPEG", (4000, 3000))
    assert decode_image(photo, MAX_PIXELS, min_longest=SIDE).image.size == (500, 375)  # 1/8 scale
    assert decode_image(photo, MAX_PIXELS, min_side=256, min_longest=SIDE).image.size == (500, 375)
    assert decode_image(photo, MAX_PIXELS, min_side=256, min_longest=1001).image.size == (2000, 1500)
    assert opened(thumbnail_from_bytes(photo, MAX_PIXELS, SIDE)).size == (384, 288)


# the 8-bit picture each high-bit-depth image below holds: black to white, left to right
GRADIENT = np.tile(np.arange(256, dtype=np.uint8), (32, 1))


def saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        saved(Image.fromarray(GRADIENT.astype(np.uint16) * 257), "PNG"),
        saved(Image.fromarray(GRADIENT.astype(np.uint16) * 257), "TIFF"),
        saved(Image.fromarray((GRADIENT.astype(np.uint16) * 257).astype(">u2")), "TIFF"),
        saved(Image.fromarray(GRADIENT.astype(np.int32) * 257), "TIFF"),
        saved(Image.fromarray(GRADIENT.astype(np.int32) * 1000 - 100_000), "TIFF"),
        saved(Image.fromarray(GRADIENT.astype(np.float32) / 255), "TIFF"),
        saved(Image.fromarray(GRADIENT.astype(np.float32) * 4 - 300), "TIFF"),
    ],
    ids=["png-I;16", "tiff-I;16", "tiff-I;16B", "tiff-I-16-bit-values", "tiff-I-signed", "tiff-F-0..1", "tiff-F-any"],
)
def test_a_high_bit_depth_greyscale_image_is_scaled_to_8_bits_not_clipped(data):
    """Pillow's convert clips 16-bit, 32-bit and float samples at 255: a 16-bit image came out nearly white, a float
    one in 0..1 black, and so did its thumbnail and its vector. They are scaled to 8 bits first."""
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I;16B", "I", "F")
    pixels = np.asarray(decode_image(data, MAX_PIXELS).image)
    assert pixels.shape == (*GRADIENT.shape, 3)
    assert np.abs(pixels.astype(int) - GRADIENT[..., None]).max() <= 1
    thumbnail = np.asarray(opened(thumbnail_from_bytes(data, MAX_PIXELS, SIDE)).convert("L"), dtype=float)
    twin = np.asarray(opened(thumbnail_from_bytes(saved(Image.fromarray(GRADIENT), "PNG"), MAX_PIXELS, SIDE)))
    assert np.abs(thumbnail - np.asarray(Image.fromarray(twin).convert("L"), dtype=float)).mean() < 2


def test_the_transparent_value_of_a_16_bit_greyscale_image_stays_transparent():
    data = saved(Image.fromarray(GRADIENT.astype(np.uint16) * 257), "PNG", transparency=100 * 257)
    pixels = np.asarray(decode_image(data, MAX_PIXELS, keep_alpha=True).image)
    assert pixels.shape == (*GRADIENT.shape, 4)
    assert (pixels[..., 3] == np.where(GRADIENT == 100, 0, 255)).all()
    assert np.abs(pixels[..., 0].astype(int) - GRADIENT).max() <= 1


@pytest.fixture(scope="module")
async def parts(make_settings):
    settings = make_settings()
    store = await open_store(settings)
    embedder = ClipEmbedder.load(settings)
    index = await open_image_index(settings, store, embedder.model_id, embedder.dim)
    yield store, index.index, embedder
    await index.close()


def indexer(parts, thumbnail_side: int | None = SIDE) -> ImageIndexHandler:
    store, index, embedder = parts
    return ImageIndexHandler(
        store=store,
        index=index,
        embedder=embedder,
        bucket=BUCKET,
        batch_size=8,
        max_pixels=MAX_PIXELS,
        max_bytes=50_000_000,
        max_elements=1000,
        clock=UniqueClock(),
        thumbnail_side=thumbnail_side,
    )


def job(message_type: str, payload: object) -> Job:
    return Job(message_id=str(uuid.uuid4()), message_type=message_type, payload=payload, priority=0)


def bucket_handler(parts, prefixes: tuple[str, ...] = ("images/",)) -> BucketEventHandler:
    store, index, _ = parts
    deleter = ImageDeleter(store=store, index=index, bucket=BUCKET)
    return BucketEventHandler(
        indexer=indexer(parts), deleter=deleter, bucket=BUCKET, prefixes=prefixes, max_bytes=10**7
    )


def event(action: str, key: str) -> Job:
    return job("bucket.event", [ObjectEvent(action=action, name=action, bucket=BUCKET, key=key)])


async def test_an_image_indexed_in_place_gets_a_thumbnail_and_loses_it_with_its_point(parts):
    store, index, _ = parts
    key = f"images/incoming/{uuid.uuid4().hex}.jpg"
    await store.put(key, encoded(4, "JPEG", (1024, 768)), "image/jpeg")
    image_id = image_id_for_key(BUCKET, key)
    handler = bucket_handler(parts)

    [outcome] = await handler.handle([event("created", key)])
    assert isinstance(outcome, Succeeded), outcome
    assert (await index.get(image_id)).thumbnail is True
    assert opened((await store.get(thumbnail_key(image_id))).data).size == (384, 288)
    assert [info.key async for info in store.list("images/originals/")] == []  # the original stays where it is

    [outcome] = await handler.handle([event("removed", key)])
    assert isinstance(outcome, Succeeded), outcome
    assert await index.get(image_id) is None
    assert not await store.exists(thumbnail_key(image_id))
    assert await store.exists(key)


async def test_the_record_of_a_turned_jpeg_has_the_size_it_is_shown_at(parts):
    store, index, _ = parts
    [outcome] = await indexer(parts).handle([job(IMAGE_INDEX, ImageIndexV1(data=oriented_jpeg(6, (1024, 768), 6)))])
    assert isinstance(outcome, Succeeded), outcome
    record = await index.get(outcome.result["id"])
    assert (record.width, record.height) == (768, 1024)
    assert opened((await store.get(thumbnail_key(record.id))).data).size == (288, 384)


async def test_bucket_events_for_thumbnails_are_skipped_even_when_their_prefix_is_watched(parts):
    store, index, _ = parts
    [stored] = await indexer(parts).handle([job(IMAGE_INDEX, ImageIndexV1(data=encoded(5), source="test"))])
    image_id = stored.result["id"]
    thumbnail = thumbnail_key(image_id)
    before = await index.count()
    handler = bucket_handler(parts)
    for action in ("created", "removed"):
        [outcome] = await handler.handle([event(action, thumbnail)])
        assert outcome.result["events"][0]["skipped"] == "thumbnails are made by this server, not indexed"
    assert await index.count() == before
    assert await index.get(image_id_for_key(BUCKET, thumbnail)) is None
    assert await store.exists(thumbnail)


async def test_image_delete_removes_the_original_and_the_thumbnail(parts):
    store, index, _ = parts
    [stored] = await indexer(parts).handle([job(IMAGE_INDEX, ImageIndexV1(data=encoded(6), source="test"))])
    image_id, original = stored.result["id"], stored.result["r2_key"]
    assert await store.exists(thumbnail_key(image_id)) and await store.exists(original)
    deleter = ImageDeleteHandler(ImageDeleter(store=store, index=index, bucket=BUCKET))
    [outcome] = await deleter.handle([job(IMAGE_DELETE, ImageDeleteV1(image_id=image_id))])
    assert outcome.result["deleted"] is True
    assert not await store.exists(thumbnail_key(image_id)) and not await store.exists(original)
    assert await index.get(image_id) is None


async def test_a_thumbnail_the_store_cannot_take_fails_the_image_for_a_retry_and_writes_no_point(parts, monkeypatch):
    store, index, _ = parts
    real_put = store.put

    async def put(key, data, content_type, **conditions):
        if key.startswith("images/thumbs/"):
            raise StorageUnavailableError("the store is down")
        return await real_put(key, data, content_type, **conditions)

    monkeypatch.setattr(store, "put", put)
    image_id = str(uuid.uuid4())
    [outcome] = await indexer(parts).handle([job(IMAGE_INDEX, ImageIndexV1(image_id=image_id, data=encoded(7)))])
    assert isinstance(outcome, Failed)
    assert (outcome.code, outcome.transient) == ("storage_unavailable", True)
    assert await index.get(image_id) is None


async def test_without_thumbnails_at_index_none_is_made_and_a_reindexed_image_loses_its_old_one(parts):
    """THUMBNAILS_AT_INDEX=0: the indexer makes none and flags none (the API makes each on its first request); an
    image indexed again drops the thumbnail of what it was, which may have changed."""
    store, index, _ = parts
    image_id = str(uuid.uuid4())
    first = ImageIndexV1(image_id=image_id, data=encoded(8, "JPEG", (640, 480)))
    [made] = await indexer(parts).handle([job(IMAGE_INDEX, first)])
    assert isinstance(made, Succeeded) and await store.exists(thumbnail_key(image_id))

    again = ImageIndexV1(image_id=image_id, data=encoded(9, "JPEG", (640, 480)))
    [outcome] = await indexer(parts, thumbnail_side=None).handle([job(IMAGE_INDEX, again)])
    assert isinstance(outcome, Succeeded), outcome
    assert (await index.get(image_id)).thumbnail is False
    assert not await store.exists(thumbnail_key(image_id))

    fresh = str(uuid.uuid4())
    new = ImageIndexV1(image_id=fresh, data=encoded(10, "JPEG", (640, 480)))
    [outcome] = await indexer(parts, thumbnail_side=None).handle([job(IMAGE_INDEX, new)])
    assert isinstance(outcome, Succeeded), outcome
    assert (await index.get(fresh)).thumbnail is False
    assert not await store.exists(thumbnail_key(fresh))
