"""image.index batches side by side (as the consumer pipelines them): one forward pass at a time, every image
stored and indexed once, and the index's maximum held across batches; with JPEGs decoded on the device (the CUDA
set-up, run here on the CPU), a broken JPEG fails alone with Pillow's reason (found by the check before the device's
decode), one that decoder refuses goes to Pillow, and the thumbnails of the rest are scaled on the device. Real
store (local files), the embedded index and the tiny CLIP."""

from __future__ import annotations

import asyncio
import io
import threading
import uuid

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from contract.bucket_events import BUCKET_EVENT, ObjectEvent
from contract.clock import UniqueClock
from contract.image_ids import image_id_for_key, thumbnail_key
from contract.messages import IMAGE_INDEX, ImageIndexV1
from infra.startup import open_image_index
from infra.storage import StorageError
from infra.storage.factory import open_store
from models.clip import ClipEmbedder
from models.tiny import clip as tiny_clip
from processor.handlers.base import Job
from processor.handlers.bucket_event import BucketEventHandler
from processor.handlers.image_delete import ImageDeleter
from processor.handlers.image_index import ImageIndexHandler
from processor.outcomes import Failed, Succeeded
from tests.support.images import encoded


@pytest.fixture
async def parts(make_settings):
    settings = make_settings()
    store = await open_store(settings)
    embedder = ClipEmbedder.load(settings)
    opened = await open_image_index(settings, store, embedder.model_id, embedder.dim)
    yield store, opened.index, embedder
    await opened.close()


def handler(
    parts, max_elements: int = 1000, embedder: ClipEmbedder | None = None, max_bytes: int = 50_000_000
) -> ImageIndexHandler:
    store, index, loaded = parts
    embedder = embedder or loaded
    return ImageIndexHandler(
        store=store,
        index=index,
        embedder=embedder,
        bucket="test",
        batch_size=8,
        max_pixels=50_000_000,
        max_bytes=max_bytes,
        max_elements=max_elements,
        clock=UniqueClock(),
        thumbnail_side=384,
    )


def index_job(data: bytes) -> Job:
    return Job(
        message_id=str(uuid.uuid4()),
        message_type=IMAGE_INDEX,
        payload=ImageIndexV1(data=data, source="test"),
        priority=0,
    )


def jobs(count: int, seed: int) -> list[Job]:
    return [index_job(encoded(seed + n, "PNG")) for n in range(count)]


async def test_batches_side_by_side_take_the_model_one_at_a_time(parts):
    indexer = handler(parts)
    embedder = parts[2]
    real = embedder.embed_prepared
    inside, most, passes = 0, 0, []
    lock = threading.Lock()

    def spy(inputs):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        try:
            passes.append(len(inputs))
            return real(inputs)
        finally:
            with lock:
                inside -= 1

    embedder.embed_prepared = spy
    try:
        batches = [jobs(8, 100 * n) for n in range(3)]
        results = await asyncio.gather(*(indexer.handle(batch) for batch in batches))
    finally:
        del embedder.embed_prepared
    assert most == 1
    assert passes == [8, 8, 8]
    outcomes = [outcome for batch in results for outcome in batch]
    assert all(isinstance(outcome, Succeeded) for outcome in outcomes), outcomes
    store, index, _ = parts
    ids = [outcome.result["id"] for outcome in outcomes]
    assert len(set(ids)) == 24
    assert await index.count() == 24
    assert len(await index.get_many(ids)) == 24
    for outcome in outcomes:
        assert (await store.get(outcome.result["r2_key"])).data


async def test_batches_side_by_side_never_overfill_the_index(parts):
    indexer = handler(parts, max_elements=10)
    results = await asyncio.gather(*(indexer.handle(jobs(6, 100 * n)) for n in range(3)))
    outcomes = [outcome for batch in results for outcome in batch]
    assert sum(isinstance(outcome, Succeeded) for outcome in outcomes) == 10
    refused = [outcome for outcome in outcomes if isinstance(outcome, Failed)]
    assert len(refused) == 8 and {outcome.code for outcome in refused} == {"index_full"}
    assert await parts[1].count() == 10


async def test_a_batch_that_asked_the_index_before_another_wrote_asks_again(parts, monkeypatch):
    """The index is asked what it holds while a batch is fetched and decoded: a batch whose fetch outlasts a whole
    batch beside it must not count on what it was told before that batch's points were written."""
    store = parts[0]
    keys = [f"late/{n}.png" for n in range(6)]
    for number, key in enumerate(keys):
        await store.put(key, encoded(200 + number, "PNG"), "image/png")
    first_done = asyncio.Event()
    get = store.get

    async def get_after_the_first_batch(key, **options):
        await first_done.wait()
        return await get(key, **options)

    monkeypatch.setattr(store, "get", get_after_the_first_batch)
    indexer = handler(parts, max_elements=10)

    async def first_batch():
        try:
            return await indexer.handle(jobs(6, 100))
        finally:
            first_done.set()

    late_jobs = [Job(str(uuid.uuid4()), IMAGE_INDEX, ImageIndexV1(key=key, source="test"), priority=0) for key in keys]
    first, late = await asyncio.gather(first_batch(), indexer.handle(late_jobs))
    assert all(isinstance(outcome, Succeeded) for outcome in first), first
    assert [isinstance(outcome, Succeeded) for outcome in late].count(True) == 4, late
    assert {outcome.code for outcome in late if isinstance(outcome, Failed)} == {"index_full"}
    assert await parts[1].count() == 10


def device_embedder(model_cache) -> ClipEmbedder:
    """The tiny CLIP set up as on CUDA (inputs made and JPEGs decoded on the device), here on the CPU."""
    folder = tiny_clip.ensure(model_cache)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", pretrained=None)
    return ClipEmbedder(
        model.eval(),
        preprocess,
        None,
        tiny_clip.MODEL_ID,
        torch.device("cpu"),
        image_tower=True,
        inputs_on_device=True,
        jpeg_on_device=True,
    )


async def test_with_jpegs_decoded_on_the_device_a_broken_one_fails_alone(parts, model_cache):
    on_device = device_embedder(model_cache)
    batch = [index_job(encoded(500 + n, "JPEG", size=(640, 480))) for n in range(6)]
    broken = index_job(encoded(600, "JPEG", size=(640, 480))[:1500])
    refused_by_device = batch[4].payload.data
    decoded: list[int] = []
    real = on_device.decode_jpegs

    def spy(jpegs):
        decoded.append(len(jpegs))
        return [None if data == refused_by_device else made for data, made in zip(jpegs, real(jpegs), strict=True)]

    on_device.decode_jpegs = spy
    shrunk: list[int] = []
    real_shrink = on_device.shrink

    def shrink_spy(images, sizes):
        shrunk.append(len(images))
        return real_shrink(images, sizes)

    on_device.shrink = shrink_spy
    indexer = handler(parts, embedder=on_device)
    outcomes = await indexer.handle([*batch[:3], broken, *batch[3:]])
    assert decoded == [6], "the batch's JPEGs are decoded on the device in one call, the broken one is not among them"
    assert [type(outcome).__name__ for outcome in outcomes] == ["Succeeded"] * 3 + ["Failed"] + ["Succeeded"] * 3
    assert outcomes[3].code == "corrupt_image"
    assert await parts[1].count() == 6
    # thumbnails: the five the device decoded are scaled there in one call; the one it refused is Pillow's
    assert shrunk == [5]
    for outcome in outcomes[:3] + outcomes[4:]:
        assert outcome.result["thumbnail"] is True
        stored = await parts[0].get(thumbnail_key(outcome.result["id"]))
        with Image.open(io.BytesIO(stored.data)) as thumbnail:
            assert (thumbnail.format, thumbnail.size) == ("WEBP", (384, 288))


@pytest.mark.parametrize("path", ["cpu", "device"])
async def test_a_16_bit_greyscale_image_is_indexed_as_its_8_bit_twin(parts, model_cache, path):
    """A 16-bit greyscale PNG (Pillow's I;16) gets the vector and the thumbnail of the same picture in 8 bits, with
    the inputs made on the CPU or on the device (DeviceInputs.pixels): Pillow's convert alone clipped it to white."""
    picture = np.asarray(Image.open(io.BytesIO(encoded(700, "PNG", size=(320, 240)))).convert("L"))
    sixteen, eight = io.BytesIO(), io.BytesIO()
    Image.fromarray(picture.astype(np.uint16) * 257).save(sixteen, format="PNG")
    Image.fromarray(picture).save(eight, format="PNG")
    embedder = device_embedder(model_cache) if path == "device" else None
    outcomes = await handler(parts, embedder=embedder).handle(
        [index_job(sixteen.getvalue()), index_job(eight.getvalue())]
    )
    assert all(isinstance(outcome, Succeeded) for outcome in outcomes), outcomes
    ids = [outcome.result["id"] for outcome in outcomes]
    vectors = [np.array(await parts[1].vector(image_id)) for image_id in ids]
    assert np.allclose(vectors[0], vectors[1], atol=1e-5)
    thumbnails = [(await parts[0].get(thumbnail_key(image_id))).data for image_id in ids]
    assert thumbnails[0] == thumbnails[1]


async def test_an_object_larger_than_the_limit_is_refused_without_being_read_whole(parts, monkeypatch):
    """By key (an upstream message, or a bucket event whose size was missing or has changed since): at most
    IMAGE_SEARCH_MAX_BYTES + 1 bytes are read. A message is dead-lettered (object_too_large); a bucket event skips
    it."""
    store, index, _ = parts
    big = encoded(9, "PNG") + bytes(20_000)  # an image with trailing bytes past the limit
    await store.put("photos/big.png", big, "image/png")
    await store.put("photos/small.png", encoded(10, "PNG"), "image/png")
    read: list[int] = []
    real_get = store.get

    async def counted(key: str, **options: int | None) -> object:
        stored = await real_get(key, **options)
        read.append(len(stored.data))
        return stored

    monkeypatch.setattr(store, "get", counted)
    indexer = handler(parts, max_bytes=len(big) - 1)
    by_key = [
        Job(message_id=str(uuid.uuid4()), message_type=IMAGE_INDEX, payload=ImageIndexV1(key=key), priority=0)
        for key in ("photos/big.png", "photos/small.png")
    ]
    refused, indexed = await indexer.handle(by_key)
    assert isinstance(refused, Failed) and refused.code == "object_too_large", refused
    assert f"{len(big)} bytes" in refused.message and "IMAGE_SEARCH_MAX_BYTES" in refused.message
    assert isinstance(indexed, Succeeded)
    assert read == [len(encoded(10, "PNG"))]  # the big one raised before anything was handed over
    assert await index.count() == 1
    deleter = ImageDeleter(store=store, index=index, bucket="test")
    events = BucketEventHandler(indexer=indexer, deleter=deleter, bucket="test", prefixes=["photos/"], max_bytes=10**7)
    event = ObjectEvent(action="created", name="PutObject", bucket="test", key="photos/big.png")  # no size given
    [outcome] = await events.handle([Job(str(uuid.uuid4()), BUCKET_EVENT, [event], 0)])
    assert isinstance(outcome, Succeeded) and "IMAGE_SEARCH_MAX_BYTES" in outcome.result["events"][0]["skipped"]


async def test_an_object_the_store_refuses_fails_alone(parts, monkeypatch):
    """A plain StorageError (S3's 403 AccessDenied, say: not transient) on one image's object fails that image
    alone: the object a message names refused to this server is `object_refused` (a bucket event skips it), its
    thumbnail's write refused is `storage_refused` (dead-lettered, a bucket event's too: replayed once the store
    lets this server write)."""
    store, index, _ = parts
    names = ("denied", "unwritable", "fine")
    for number, name in enumerate(names):
        await store.put(f"photos/{name}.png", encoded(40 + number, "PNG"), "image/png")
    unwritable = thumbnail_key(image_id_for_key("test", "photos/unwritable.png"))
    real_get, real_put = store.get, store.put

    async def get(key: str, **options: int | None) -> object:
        if key == "photos/denied.png":
            raise StorageError(f"object store refused {key!r}: AccessDenied (403)")
        return await real_get(key, **options)

    async def put(key: str, data: bytes, content_type: str, **options: object) -> object:
        if key == unwritable:
            raise StorageError(f"object store refused {key!r}: AccessDenied (403)")
        return await real_put(key, data, content_type, **options)

    monkeypatch.setattr(store, "get", get)
    monkeypatch.setattr(store, "put", put)
    indexer = handler(parts)
    by_key = [Job(str(uuid.uuid4()), IMAGE_INDEX, ImageIndexV1(key=f"photos/{name}.png"), 0) for name in names]
    denied, unwritten, indexed = await indexer.handle(by_key)
    assert isinstance(denied, Failed) and denied.code == "object_refused" and "AccessDenied" in denied.message
    assert isinstance(unwritten, Failed) and unwritten.code == "storage_refused", unwritten
    assert isinstance(indexed, Succeeded), indexed
    assert await index.count() == 1
    deleter = ImageDeleter(store=store, index=index, bucket="test")
    events = BucketEventHandler(indexer=indexer, deleter=deleter, bucket="test", prefixes=["photos/"], max_bytes=10**7)
    created = [
        Job(str(uuid.uuid4()), BUCKET_EVENT, [ObjectEvent("created", "PutObject", "test", f"photos/{name}.png")], 0)
        for name in names[:2]
    ]
    skipped, failed = await events.handle(created)
    assert isinstance(skipped, Succeeded) and "AccessDenied" in skipped.result["events"][0]["skipped"]
    assert isinstance(failed, Failed) and failed.code == "storage_refused", failed
