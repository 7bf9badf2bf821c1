"""Embedded index snapshots to R2 (IMAGE_SEARCH_DB_BACKUP_*): written at shutdown, restored into an empty index."""

from __future__ import annotations

import base64
import io

from PIL import Image

from processor.contract import IMAGE_INDEX
from processor.runtime import Runtime
from processor.service import build_consumer
from tests.support.amqp import publish, wait_until
from tests.support.images import encoded


async def _index_three(runtime: Runtime) -> list[str]:
    consumer = build_consumer(runtime)
    await consumer.start()
    ids = []
    for seed in range(3):
        body = {"data": base64.b64encode(encoded(500 + seed)).decode()}
        ids.append(await publish(runtime.settings.amqp_url, IMAGE_INDEX, body))

    async def indexed() -> bool:
        return await runtime.index.count() == 3

    await wait_until(indexed)
    await consumer.stop()
    return ids


async def test_snapshot_at_shutdown_restores_into_an_empty_index(make_settings, s3):
    bucket = s3.new_bucket()
    first = await Runtime.open(make_settings(r2_bucket=bucket, endpoint=s3.endpoint))
    ids = await _index_three(first)
    with Image.open(io.BytesIO(encoded(500))) as picture:
        vector = first.clip.embed_images([picture.convert("RGB")])[0]
    await first.close()
    assert "image_search.db" in s3.keys(bucket)

    second = await Runtime.open(make_settings(r2_bucket=bucket, endpoint=s3.endpoint))
    try:
        assert await second.index.count() == 3
        assert set((await second.index.get_many(ids)).keys()) == set(ids)
        [(best, score), *_] = await second.index.search(vector.tolist(), 3)
        assert best.id == ids[0]
        assert score > 0.99
    finally:
        await second.close()


async def test_no_snapshot_when_backup_is_disabled(make_settings, s3):
    bucket = s3.new_bucket()
    runtime = await Runtime.open(
        make_settings(r2_bucket=bucket, endpoint=s3.endpoint, IMAGE_SEARCH_DB_BACKUP_ENABLED="0")
    )
    await _index_three(runtime)
    await runtime.close()
    assert "image_search.db" not in s3.keys(bucket)
