"""image.index batches side by side (as the consumer pipelines them): one forward pass at a time, every image
stored and indexed once, and the index's maximum held across batches. Real store (local files), the embedded
index and the tiny CLIP."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from contract.clock import UniqueClock
from contract.messages import IMAGE_INDEX, ImageIndexV1
from infra.startup import open_image_index
from infra.storage.factory import open_store
from models.clip import ClipEmbedder
from processor.handlers.base import Job
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


def handler(parts, max_elements: int = 1000) -> ImageIndexHandler:
    store, index, embedder = parts
    return ImageIndexHandler(
        store=store,
        index=index,
        embedder=embedder,
        bucket="test",
        batch_size=8,
        max_pixels=50_000_000,
        max_elements=max_elements,
        clock=UniqueClock(),
    )


def jobs(count: int, seed: int) -> list[Job]:
    return [
        Job(
            message_id=str(uuid.uuid4()),
            message_type=IMAGE_INDEX,
            payload=ImageIndexV1(data=encoded(seed + n, "PNG"), source="test"),
            priority=0,
        )
        for n in range(count)
    ]


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
