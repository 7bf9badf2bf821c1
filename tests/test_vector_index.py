"""One contract for both VectorIndex implementations: the embedded Qdrant Edge engine, and qdrant-client against
the server API (its local mode stands in for a Qdrant server, which cannot be run here)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from qdrant_client.http.exceptions import UnexpectedResponse

from infra.vectors import EmbeddingModelMismatchError, ImageFilter, ImageRecord, ListingPosition, VectorIndex
from infra.vectors.edge.client import EdgeIndex
from infra.vectors.server import QdrantServerIndex

DIM = 8


@pytest.fixture(params=["edge", "server-api"])
async def index(request, tmp_path) -> AsyncIterator[VectorIndex]:
    if request.param == "edge":
        opened: VectorIndex = await EdgeIndex.open(tmp_path / "db", "images", build_points=0, log_format="console")
    else:
        opened = QdrantServerIndex.local(str(tmp_path / "local"), "images")
    await opened.ensure_collection("model-a", DIM)
    try:
        yield opened
    finally:
        await opened.close()


def unit(*values: float) -> list[float]:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[: len(values)] = values
    return (vector / np.linalg.norm(vector)).tolist()


def record(created_us: int, *, source: str = "upload", content_type: str = "image/png", **extra) -> ImageRecord:
    image_id = extra.pop("id", str(uuid.uuid4()))
    return ImageRecord(
        id=image_id,
        r2_key=f"images/originals/{image_id}.png",
        content_type=content_type,
        size=100,
        width=10,
        height=10,
        created_at=f"t{created_us}",
        created_us=created_us,
        source=source,
        **extra,
    )


async def test_upsert_get_and_get_many(index):
    first, second = record(1, filename="a.png"), record(2)
    await index.upsert([(first, unit(1)), (second, unit(0, 1))])
    assert await index.get(first.id) == first
    assert await index.get(str(uuid.uuid4())) is None
    found = await index.get_many([first.id, second.id, str(uuid.uuid4())])
    assert found == {first.id: first, second.id: second}
    assert await index.count() == 2


async def test_re_upsert_replaces_the_point(index):
    original = record(1)
    await index.upsert([(original, unit(1))])
    changed = ImageRecord(**{**{f: getattr(original, f) for f in original.__struct_fields__}, "width": 99})
    await index.upsert([(changed, unit(0, 1))])
    await index.upsert([(changed, unit(0, 1))])
    assert await index.count() == 1
    assert (await index.get(original.id)).width == 99
    [(best, score)] = await index.search(unit(0, 1), 1)
    assert best.id == original.id
    assert score == pytest.approx(1.0, abs=1e-5)


async def test_vector_reads_back_what_was_stored_and_none_for_an_unknown_id(index):
    stored, with_thumbnail = record(1), record(2, thumbnail=True)
    await index.upsert([(stored, unit(3, 4)), (with_thumbnail, unit(0, 1))])
    assert await index.vector(stored.id) == pytest.approx(unit(3, 4), abs=1e-6)
    assert await index.vector(str(uuid.uuid4())) is None
    assert (await index.get(with_thumbnail.id)).thumbnail is True
    assert (await index.get(stored.id)).thumbnail is False


async def test_delete(index):
    kept, gone = record(1), record(2)
    await index.upsert([(kept, unit(1)), (gone, unit(1, 1))])
    await index.delete(gone.id)
    await index.delete(gone.id)
    await index.delete(str(uuid.uuid4()))
    assert await index.count() == 1
    assert await index.get(gone.id) is None
    assert [hit.id for hit, _ in await index.search(unit(1, 1), 5)] == [kept.id]


async def test_search_orders_by_cosine_similarity(index):
    near, middle, far = record(1), record(2), record(3)
    await index.upsert([(far, unit(-1, 0.1)), (near, unit(1, 0.1)), (middle, unit(1, 1))])
    hits = await index.search(unit(1), 3)
    assert [hit.id for hit, _ in hits] == [near.id, middle.id, far.id]
    scores = [score for _, score in hits]
    assert scores[0] == pytest.approx(1 / np.sqrt(1.01), abs=1e-4)
    assert scores[1] == pytest.approx(1 / np.sqrt(2), abs=1e-4)
    assert scores[2] == pytest.approx(-1 / np.sqrt(1.01), abs=1e-4)
    assert [hit.id for hit, _ in await index.search(unit(1), 2)] == [near.id, middle.id]


async def test_filters_on_search_listing_and_count(index):
    upload_png = record(100, source="upload", content_type="image/png")
    upload_jpeg = record(200, source="upload", content_type="image/jpeg")
    bucket_png = record(300, source="bucket", content_type="image/png")
    await index.upsert([(upload_png, unit(1)), (upload_jpeg, unit(1, 0.5)), (bucket_png, unit(1, 1))])

    uploads = ImageFilter(sources=("upload",))
    assert {hit.id for hit, _ in await index.search(unit(1, 1), 10, uploads)} == {upload_png.id, upload_jpeg.id}
    assert await index.count(uploads) == 2
    pngs = ImageFilter(content_types=("image/png",))
    assert [r.id for r in await index.newest(10, image_filter=pngs)] == [bucket_png.id, upload_png.id]
    either = ImageFilter(sources=("upload", "bucket"), content_types=("image/jpeg", "image/png"))
    assert await index.count(either) == 3
    window = ImageFilter(created_after_us=100, created_before_us=300)
    assert [hit.id for hit, _ in await index.search(unit(1), 10, window)] == [upload_jpeg.id]
    assert await index.count(ImageFilter(created_after_us=150)) == 2
    assert await index.count(ImageFilter(created_before_us=150)) == 1
    assert await index.count(ImageFilter(sources=("nowhere",))) == 0
    assert await index.search(unit(1), 10, ImageFilter(sources=("nowhere",))) == []


async def test_listing_newest_first_with_a_cursor(index):
    records = [record(1000 + step) for step in range(7)]
    await index.upsert([(item, unit(1, step)) for step, item in enumerate(records)])
    newest_first = [item.id for item in reversed(records)]
    page = await index.newest(3)
    assert [item.id for item in page] == newest_first[:3]
    page = await index.newest(3, after=ListingPosition.of(page[-1]))
    assert [item.id for item in page] == newest_first[3:6]
    page = await index.newest(3, after=ListingPosition.of(page[-1]))
    assert [item.id for item in page] == newest_first[6:]
    assert await index.newest(3, after=ListingPosition.of(page[-1])) == []
    narrowed = ImageFilter(created_before_us=1005)
    after = ListingPosition(created_us=1006)
    assert [item.id for item in await index.newest(2, after=after, image_filter=narrowed)] == newest_first[2:4]


def listing_order(records: list[ImageRecord]) -> list[str]:
    """Newest first; records created in the same microsecond by id (as UUIDs, which is also their text's order)."""
    return [item.id for item in sorted(records, key=lambda item: (-item.created_us, uuid.UUID(item.id)))]


async def all_pages(index: VectorIndex, limit: int, image_filter: ImageFilter | None = None) -> list[str]:
    seen: list[str] = []
    after = None
    while page := await index.newest(limit, after=after, image_filter=image_filter):
        assert len(page) <= limit
        seen += [item.id for item in page]
        after = ListingPosition.of(page[-1])
    return seen


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 9])
async def test_pages_list_records_created_in_the_same_microsecond_each_once(index, limit):
    """Processors with their own clocks on one Qdrant server can give images the same created_us; a page that ends
    among them is followed by one that starts right after its last record."""
    times = [1003, 1002, 1002, 1002, 1002, 1001, 1001, 1000]
    records = [record(created_us) for created_us in times]
    await index.upsert([(item, unit(1, step)) for step, item in enumerate(records)])
    assert await all_pages(index, limit) == listing_order(records)


async def test_a_filtered_listing_pages_through_records_of_one_microsecond(index):
    tied = [record(2000, source="bucket" if step % 3 else "upload") for step in range(9)]
    others = [record(2001, source="bucket"), record(1999, source="bucket"), record(2002, source="upload")]
    await index.upsert([(item, unit(1, step)) for step, item in enumerate(tied + others)])
    buckets = [item for item in tied + others if item.source == "bucket"]
    assert await all_pages(index, 2, ImageFilter(sources=("bucket",))) == listing_order(buckets)
    window = ImageFilter(created_after_us=1999, created_before_us=2001)
    assert await all_pages(index, 4, window) == listing_order(tied)


async def test_many_records_of_one_microsecond_written_in_several_batches_page_in_id_order(index):
    records = [record(5000) for _ in range(240)]
    for start in range(0, len(records), 60):
        await index.upsert([(item, unit(1, step)) for step, item in enumerate(records[start : start + 60])])
    assert await all_pages(index, 25) == listing_order(records)


async def test_a_page_goes_on_after_a_cursor_whose_record_was_deleted(index):
    records = [record(3000) for _ in range(5)] + [record(2999)]
    await index.upsert([(item, unit(1, step)) for step, item in enumerate(records)])
    ordered = listing_order(records)
    first = await index.newest(2)
    assert [item.id for item in first] == ordered[:2]
    await index.delete(first[-1].id)
    page = await index.newest(3, after=ListingPosition.of(first[-1]))
    assert [item.id for item in page] == ordered[2:5]


async def test_a_position_without_an_id_starts_before_its_microsecond(index):
    """What a listing cursor of the earlier form (a creation time alone) decodes to: the records created before it."""
    records = [record(4001), record(4000), record(4000), record(3999), record(3998)]
    await index.upsert([(item, unit(1, step)) for step, item in enumerate(records)])
    page = await index.newest(5, after=ListingPosition(created_us=4000))
    assert [item.id for item in page] == [records[3].id, records[4].id]
    page = await index.newest(5, after=ListingPosition(created_us=4001))
    assert [item.id for item in page] == listing_order(records[1:])


async def test_a_page_goes_on_past_tied_records_deleted_while_it_is_read(index, monkeypatch):
    """A page whose end cuts through a microsecond reads it again; images of it deleted in between leave the page
    short of them, so it goes on with the older ones: a short page would tell the API the listing ended there."""
    newer, older = record(6001), record(5999)
    tied = [record(6000), record(6000)]
    await index.upsert([(item, unit(1, step)) for step, item in enumerate([newer, *tied, older])])
    newest_first = index._newest_first

    async def then_tied_deleted(limit: int, image_filter: ImageFilter) -> list[ImageRecord]:
        found = await newest_first(limit, image_filter)
        for item in tied:
            await index.delete(item.id)
        return found

    monkeypatch.setattr(index, "_newest_first", then_tied_deleted)
    assert [item.id for item in await index.newest(2)] == [newer.id, older.id]


async def test_a_collection_built_with_another_model_is_refused(index):
    await index.ensure_collection("model-a", DIM)
    with pytest.raises(EmbeddingModelMismatchError, match="model-a"):
        await index.ensure_collection("model-b", DIM)
    with pytest.raises(EmbeddingModelMismatchError):
        await index.ensure_collection("model-a", DIM * 2)


@pytest.mark.parametrize(("model_id", "dim", "refused"), [("model-a", DIM, False), ("model-b", DIM, True)])
async def test_a_process_that_loses_the_race_to_create_the_collection_checks_the_winners(
    tmp_path, monkeypatch, model_id, dim, refused
):
    """Processes starting together on an empty Qdrant server: each finds no collection, one creates it, and the
    others' creates are answered 409; they check the collection as if they had found it."""
    index = QdrantServerIndex.local(str(tmp_path / "local"), "images")
    await index.ensure_collection("model-a", DIM)  # the winner, made between the loser's look and its create

    async def not_yet(name: str) -> bool:
        return False

    async def conflict(name: str, **config: object) -> None:
        content = b'{"status":{"error":"Wrong input: Collection `images` already exists!"}}'
        raise UnexpectedResponse(409, "Conflict", content, httpx.Headers())

    monkeypatch.setattr(index._client, "collection_exists", not_yet)
    monkeypatch.setattr(index._client, "create_collection", conflict)
    try:
        if refused:
            with pytest.raises(EmbeddingModelMismatchError, match="model-a"):
                await index.ensure_collection(model_id, dim)
        else:
            await index.ensure_collection(model_id, dim)
            assert (await index.stats()).model_id == "model-a"
    finally:
        await index.close()


async def test_stats(index):
    await index.upsert([(record(step), unit(1, step)) for step in range(5)])
    stats = await index.stats()
    assert stats.points == 5
    assert stats.model_id == "model-a"
    assert stats.dim == DIM
    assert stats.engine in {"qdrant-edge", "qdrant-client-local"}


async def test_the_revision_changes_with_every_write_and_only_then(index):
    first = await index.revision()
    image = record(1)
    await index.upsert([(image, unit(1))])
    upserted = await index.revision()
    assert upserted != first
    await index.search(unit(1), 1)
    await index.get(image.id)
    await index.count()
    await index.stats()
    assert await index.revision() == upserted
    await index.delete(image.id)
    assert await index.revision() not in {first, upserted}


async def test_the_embedded_revision_counts_the_writes_of_attached_processes(tmp_path):
    """What the processor's backups compare: an API attached to its engine writes too (DELETE /v1/images/{id})."""
    owner = await EdgeIndex.open(tmp_path / "db", "images", build_points=0, log_format="console")
    try:
        await owner.ensure_collection("model-a", DIM)
        api = await EdgeIndex.attach(tmp_path / "db", "images")
        assert api is not None
        try:
            image = record(1)
            before = await owner.revision()
            await api.upsert([(image, unit(1))])
            upserted = await owner.revision()
            assert upserted != before
            await api.delete(image.id)
            assert await owner.revision() not in {before, upserted}
            assert await api.revision() == await owner.revision()
        finally:
            await api.close()
    finally:
        await owner.close()
