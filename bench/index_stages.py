"""Where indexing time goes, stage by stage, with the product's own code: decode (full and draft scale) and
preprocessing in 1 and N threads, the forward from prepared inputs, and each awaited step of
`ImageIndexHandler.handle` (its calls wrapped with timers) for inline messages and for objects in the store.

    .venv/bin/python -m bench.index_stages [--images 512] [--batch 128] [--threads 16]

The figures in docs/benchmarks.md ("where the time goes") come from it. Per-step times of concurrent calls are
summed, so they can exceed the wall time of the batch that holds them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.index import MAX_PIXELS, bench_handler, index_job, load_tower, photo
from contract.imaging import decode_image
from contract.messages import ImageIndexV1
from contract.thumbnails import thumbnail_from_bytes, thumbnail_from_pixels, thumbnail_size
from infra.logging import configure_logging
from infra.settings import DEFAULT_CLIP_MODEL, Settings
from infra.startup import open_image_index
from infra.storage.factory import open_store
from models.clip import ClipEmbedder
from models.runner import Placement
from processor.handlers.image_index import pillow_inputs

THUMBNAIL_SIDE = 384  # THUMBNAIL_MAX_SIDE's default


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def rate(label: str, count: int, work: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = work()
    out(f"{label}: {count / (time.perf_counter() - started):.0f} images/s")
    return result


def cpu_stages(embedder: ClipEmbedder, photos: list[bytes], threads: int, batch: int) -> None:
    prepared: list[Any] = []
    for workers in sorted({1, threads}):
        with ThreadPoolExecutor(workers) as pool:
            prepared = pool_stages(embedder, photos, pool, workers)
    count = len(photos)
    if embedder.decodes_jpeg:
        decoded = rate(
            f"decode on the device (decode_jpegs), batch {batch}",
            count,
            lambda: [embedder.decode_jpegs(photos[first : first + batch]) for first in range(0, count, batch)],
        )
        device_thumbnails(embedder, decoded, threads)
    rate(
        f"embed_prepared from prepared inputs, batch {batch}",
        count,
        lambda: [embedder.embed_prepared(prepared[first : first + batch]) for first in range(0, count, batch)],
    )


def device_thumbnails(embedder: ClipEmbedder, decoded: list[list[Any]], threads: int) -> None:
    """The GPU path's thumbnails: each batch scaled on the device (shrink), then WebP-encoded in the threads."""
    count = sum(len(batch) for batch in decoded)

    def sizes(batch: list[Any]) -> list[tuple[int, int]]:
        return [thumbnail_size(pixels.shape[2], pixels.shape[1], THUMBNAIL_SIDE) for pixels in batch]

    small = rate(
        "thumbnails scaled on the device (shrink), per batch",
        count,
        lambda: [array for batch in decoded for array in embedder.shrink(batch, sizes(batch))],
    )
    with ThreadPoolExecutor(threads) as pool:
        rate(
            f"WebP thumbnails from those pixels, {threads} threads",
            count,
            lambda: list(pool.map(thumbnail_from_pixels, small)),
        )


def pool_stages(embedder: ClipEmbedder, photos: list[bytes], pool: ThreadPoolExecutor, workers: int) -> list[Any]:
    count = len(photos)
    rate(f"decode, full size, {workers} threads", count, lambda: list(pool.map(_full, photos)))
    rate(f"decode, draft scale, {workers} threads", count, lambda: list(pool.map(_draft(embedder), photos)))
    rate(
        f"thumbnail from the bytes (the API's, made when first asked for), {workers} threads",
        count,
        lambda: list(pool.map(lambda data: thumbnail_from_bytes(data, MAX_PIXELS, THUMBNAIL_SIDE), photos)),
    )
    return rate(
        f"decode + prepare + thumbnail by Pillow (pillow_inputs), {workers} threads",
        count,
        lambda: [
            made.inputs
            for made in pool.map(lambda data: pillow_inputs(embedder, data, MAX_PIXELS, THUMBNAIL_SIDE), photos)
        ],
    )


def _full(data: bytes) -> None:
    decode_image(data, MAX_PIXELS).image.close()


def _draft(embedder: ClipEmbedder) -> Callable[[bytes], None]:
    return lambda data: decode_image(data, MAX_PIXELS, min_side=embedder.input_size).image.close()


class Timers:
    """Wraps calls so that the time spent in each is summed under a name."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)
        if asyncio.iscoroutinefunction(original):

            @functools.wraps(original)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    self.spent[name] += time.perf_counter() - started

            setattr(owner, attribute, timed_async)
            return

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - started

        setattr(owner, attribute, timed)


async def handler_stages(embedder: ClipEmbedder, photos: list[bytes], threads: int, batch: int) -> None:
    count = len(photos)
    with tempfile.TemporaryDirectory() as root:
        settings = Settings.from_env(
            {
                "LOCAL_STORAGE_DIR": f"{root}/storage",
                "IMAGE_SEARCH_DB_PATH": f"{root}/qdrant",
                "IMAGE_SEARCH_DB_BACKUP_ENABLED": "0",
            }
        )
        store = await open_store(settings)
        opened = await open_image_index(settings, store, embedder.model_id, embedder.dim)
        try:
            keys = [f"images/incoming/stage-{n}.jpg" for n in range(count)]
            for key, data in zip(keys, photos, strict=True):
                await store.put(key, data, "image/jpeg")
            timers = Timers()
            for attribute in ("upsert", "get_many", "count"):
                timers.wrap(opened.index, attribute, f"index.{attribute}")
            for attribute in ("put", "get"):
                timers.wrap(store, attribute, f"store.{attribute}")
            timers.wrap(embedder, "embed_prepared", "embed_prepared (its thread)")
            if embedder.decodes_jpeg:
                timers.wrap(embedder, "decode_jpegs", "decode_jpegs on the device (its thread)")
            handler = bench_handler(store, opened.index, embedder, batch, threads, settings.thumbnail_max_side)
            timers.wrap(handler, "_index_batch", "embed, store, upsert (wall)")
            inline = [index_job(ImageIndexV1(data=data, image_id=str(uuid.uuid4()), source="bench")) for data in photos]
            in_place = [index_job(ImageIndexV1(key=key, source="bucket-event")) for key in keys]
            for label, jobs in (("inline image.index", inline), ("bucket events (in place)", in_place)):
                await handler.handle(jobs[:batch])  # warm-up
                timers.spent.clear()
                started = time.perf_counter()
                for first in range(0, count, batch):
                    await handler.handle(jobs[first : first + batch])
                wall = time.perf_counter() - started
                out(f"{label}, batch {batch}: {count / wall:.0f} images/s; per image, ms:")
                out(f"   whole batch calls: {1000 * wall / count:.3f}")
                fetch_decode = wall - timers.spent["embed, store, upsert (wall)"]
                out(f"   fetch + decode + prepare, all at once (wall): {1000 * fetch_decode / count:.3f}")
                for name, seconds in sorted(timers.spent.items(), key=lambda item: -item[1]):
                    out(f"   {name} (summed): {1000 * seconds / count:.3f}")
        finally:
            await opened.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_CLIP_MODEL)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    configure_logging("warning", "console")
    placement = Placement.choose(args.device, args.dtype)
    device = placement.device
    embedder = load_tower(args.model, device, placement.dtype)
    photos = [photo(seed) for seed in range(args.images)]
    out(f"model {args.model}, device {device}, dtype {embedder.dtype}, {os.cpu_count()} CPUs, `{' '.join(sys.argv)}`")
    cpu_stages(embedder, photos, args.threads, args.batch)
    asyncio.run(handler_stages(embedder, photos, args.threads, args.batch))


if __name__ == "__main__":
    main()
