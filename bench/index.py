"""Indexing throughput against its floor: images per second through the processor's batch path, as a ratio to
the bare batched forward pass of the same image tower on the same device, dtype and batch size, measured in the
same run.

    .venv/bin/python bench/index.py [--images 128] [--batch-sizes 1,8,32,64,128] [--device cuda] [--dtype auto]

- floor: `ClipEmbedder.embed_prepared` on pre-made input tensors (no decode, no storage, no index);
- `image.index`: inline 1024x768 JPEGs through `ImageIndexHandler.handle` (decode in the worker pool, store the
  original, embed, upsert into the embedded index);
- bucket events: the same JPEGs already in the store, indexed in place (fetch, decode, embed, upsert).

It drives the processor's batch function directly (no broker: it runs on a device machine too). The default CLIP
(ViT-B-16-SigLIP2-256) at its real size with random weights: the same compute as the trained one, no download.
Prints a Markdown table (docs/benchmarks.md holds the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import random
import sys
import tempfile
import time
import uuid

import open_clip
import torch
from PIL import Image, ImageDraw

from contract.clock import UniqueClock
from contract.messages import IMAGE_INDEX, ImageIndexV1
from infra.logging import configure_logging
from infra.settings import DEFAULT_CLIP_MODEL, Settings
from infra.startup import open_image_index
from infra.storage import ObjectStore
from infra.storage.factory import open_store
from infra.vectors import VectorIndex
from models.clip import ClipEmbedder
from models.device import pick_device, pick_dtype
from processor.handlers.base import Job
from processor.handlers.image_index import ImageIndexHandler

MAX_PIXELS = 50_000_000


def photo(seed: int, size: tuple[int, int] = (1024, 768)) -> bytes:
    """A 1024x768 JPEG with smooth gradients and shapes, about the size of a phone photo's preview."""
    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        radius = rng.randrange(20, 200)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=tuple(rng.randrange(256) for _ in "rgb"))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def load_tower(name: str, device: torch.device, dtype: torch.dtype) -> ClipEmbedder:
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
    model.eval()
    return ClipEmbedder(model, preprocess, None, name, device, dtype, image_tower=True)


def floor(embedder: ClipEmbedder, device: torch.device, batch: int, images: int) -> float:
    size = embedder.input_size
    inputs = [torch.randn(3, size, size, device=device) for _ in range(batch)]  # already on the device
    embedder.embed_prepared(inputs)  # warm-up
    passes = max(1, images // batch)
    started = time.perf_counter()
    for _ in range(passes):
        embedder.embed_prepared(inputs)
    return passes * batch / (time.perf_counter() - started)


async def through_handler(handler: ImageIndexHandler, jobs: list[Job], batch: int) -> float:
    await handler.handle(jobs[:batch])  # warm-up (its images are indexed again below: an update)
    started = time.perf_counter()
    for first in range(0, len(jobs), batch):
        await handler.handle(jobs[first : first + batch])
    return len(jobs) / (time.perf_counter() - started)


async def run(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    embedder = load_tower(args.model, device, dtype)
    photos = [photo(seed) for seed in range(args.images)]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        env = {
            "LOCAL_STORAGE_DIR": f"{root}/storage",
            "IMAGE_SEARCH_DB_PATH": f"{root}/qdrant",
            "IMAGE_SEARCH_DB_BACKUP_ENABLED": "0",
            "LOG_LEVEL": "warning",
        }
        settings = Settings.from_env(env)
        store = await open_store(settings)
        opened = await open_image_index(settings, store, embedder.model_id, embedder.dim)
        try:
            keys = [f"images/incoming/bench-{n}.jpg" for n in range(args.images)]
            for key, data in zip(keys, photos, strict=True):
                await store.put(key, data, "image/jpeg")
            for batch in args.batch_sizes:
                handler = bench_handler(store, opened.index, embedder, batch, settings.image_decode_threads)
                inline = [
                    index_job(ImageIndexV1(data=data, image_id=str(uuid.uuid4()), source="bench")) for data in photos
                ]
                in_place = [index_job(ImageIndexV1(key=key, source="bucket-event")) for key in keys]
                bare = floor(embedder, device, batch, args.images)
                index_rate = await through_handler(handler, inline, batch)
                event_rate = await through_handler(handler, in_place, batch)
                rows.append((batch, bare, index_rate, event_rate))
                _report_row(*rows[-1])
        finally:
            await opened.close()
    _report(args, device, dtype, rows)


def bench_handler(
    store: ObjectStore, index: VectorIndex, embedder: ClipEmbedder, batch: int, decode_threads: int
) -> ImageIndexHandler:
    """The processor's image.index handler over the benchmark's store and index, with room for any number."""
    return ImageIndexHandler(
        store=store,
        index=index,
        embedder=embedder,
        bucket="bench",
        batch_size=batch,
        max_pixels=MAX_PIXELS,
        max_elements=10_000_000,
        clock=UniqueClock(),
        decode_threads=decode_threads,
    )


def index_job(payload: ImageIndexV1) -> Job:
    return Job(message_id=str(uuid.uuid4()), message_type=IMAGE_INDEX, payload=payload, priority=0)


def _report_row(batch: int, bare: float, index_rate: float, event_rate: float) -> None:
    sys.stderr.write(f"batch {batch}: floor {bare:.1f}/s, image.index {index_rate:.1f}/s, events {event_rate:.1f}/s\n")


def _report(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, rows: list[tuple]) -> None:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    lines = [
        f"model {args.model} (random weights), device {device} ({gpu}), dtype {str(dtype).removeprefix('torch.')}, "
        f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, {args.images} images of 1024x768 (JPEG), "
        f"`{' '.join(sys.argv)}`",
        "",
        "| batch | floor (images/s) | image.index (images/s) | ratio | bucket events (images/s) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for batch, bare, index_rate, event_rate in rows:
        lines.append(
            f"| {batch} | {bare:.1f} | {index_rate:.1f} | {index_rate / bare:.0%} | {event_rate:.1f} | "
            f"{event_rate / bare:.0%} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_CLIP_MODEL)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8,32,64,128", type=lambda v: [int(b) for b in v.split(",")])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="CLIP_DTYPE: auto, float32, float16, bfloat16")
    args = parser.parse_args()
    configure_logging("warning", "console")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
