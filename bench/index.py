"""Indexing throughput against its floor: images per second through the processor's path, as a ratio to the bare
batched forward pass of the same image tower on the same device, dtype and batch size, measured in the same run.

    .venv/bin/python -m bench.index [--images 128] [--batch-sizes 1,8,32,64,128] [--device cuda] [--dtype auto]
    .venv/bin/python -m bench.index --no-broker ...     # on a machine without RabbitMQ (a device machine)

- floor: `ClipEmbedder.embed_prepared` on pre-made input tensors (no decode, no storage, no index);
- `image.index`: N messages with inline 1024x768 JPEGs, from the first publish to the last ack, through a
  throwaway RabbitMQ node and the processor's consumer (scheduler, batches pipelined, settler) and handler (decode
  in the worker pool, store the original in an S3 server, embed, upsert into the embedded index);
- bucket events: N R2 notifications for the same JPEGs already in the S3 server, indexed in place.

With --no-broker the consumer's scheduler drives the handler directly (no RabbitMQ, a local-folder store), so it
runs on a device machine too. The default CLIP (ViT-B-16-SigLIP2-256) at its real size with random weights: the same
compute as the trained one, no download. Prints a Markdown table (docs/benchmarks.md holds the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import open_clip
import torch
from PIL import Image, ImageDraw

from contract import metrics
from contract.bucket_events import BUCKET_EVENT
from contract.clock import UniqueClock
from contract.jobs import JobStore
from contract.messages import IMAGE_INDEX, JSON, MSGPACK, ImageIndexV1, encode
from infra.logging import configure_logging
from infra.settings import DEFAULT_CLIP_MODEL, Settings
from infra.startup import Plumbing, open_image_index
from infra.storage import ObjectStore
from infra.storage.factory import open_store
from infra.vectors import VectorIndex
from models.clip import ClipEmbedder
from models.runner import Placement
from processor.consumer import Consumer
from processor.handlers.base import Handler, Job
from processor.handlers.bucket_event import BucketEventHandler
from processor.handlers.image_delete import ImageDeleter
from processor.handlers.image_index import ImageIndexHandler
from processor.outcomes import Outcome, Succeeded
from processor.scheduler import Lane, Scheduler

MAX_PIXELS = 50_000_000
MAX_BYTES = 50 * 1024 * 1024
PATH_BROKER = "through RabbitMQ and an S3 server, first publish to last ack"
PATH_NO_BROKER = "scheduler and handler on a local store (--no-broker)"


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
    """Images per second through the consumer's scheduler (batches pipelined as in the processor) and the handler;
    every job must succeed."""
    await handler.handle(jobs[:batch])  # warm-up (its images are indexed again below: an update)
    finished = asyncio.Event()
    failures: list[Outcome] = []
    remaining = len(jobs)

    async def run_batch(taken: list[Job]) -> None:
        nonlocal remaining
        outcomes = await handler.handle(taken)
        failures.extend(outcome for outcome in outcomes if not isinstance(outcome, Succeeded))
        remaining -= len(taken)
        if remaining == 0:
            finished.set()

    scheduler: Scheduler[Job] = Scheduler(
        run_batch,
        lanes={IMAGE_INDEX: Lane(batch, handler.pipelined)},
        type_of=lambda job: job.message_type,
        priority_of=lambda job: job.priority,
    )
    started = time.perf_counter()
    for job in jobs:
        scheduler.push(job)
    scheduler.start()
    await finished.wait()
    elapsed = time.perf_counter() - started
    await scheduler.stop()
    if failures:
        raise RuntimeError(f"{len(failures)} jobs failed, the first: {failures[0]}")
    return len(jobs) / elapsed


async def through_broker(
    plumbing: Plumbing,
    embedder: ClipEmbedder,
    index: VectorIndex,
    batch: int,
    decode_threads: int,
    thumbnail_side: int | None,
    messages: list,
) -> float:
    """Images per second from the first publish to the last ack, through RabbitMQ and the processor's consumer
    (scheduler, handlers, settler) with this batch size; every message must succeed."""
    indexer = bench_handler(
        plumbing.store, index, embedder, batch, decode_threads, thumbnail_side, bucket=plumbing.bucket
    )
    handlers: dict[str, Handler] = {
        IMAGE_INDEX: indexer,
        BUCKET_EVENT: BucketEventHandler(
            indexer=indexer,
            deleter=ImageDeleter(store=plumbing.store, index=index, bucket=plumbing.bucket),
            bucket=plumbing.bucket,
            prefixes=["images/"],
            max_bytes=MAX_BYTES,
        ),
    }
    consumer = Consumer(
        plumbing.connection,
        plumbing.publisher,
        handlers,
        {},
        max_attempts=1,
        jobs=JobStore(plumbing.store, 7),
        store=plumbing.store,
        capabilities=("index",),
        max_interrupted_runs=3,
    )
    await consumer.start()
    try:
        await _publish_and_wait(plumbing, messages[:batch])  # warm-up
        started = time.perf_counter()
        await _publish_and_wait(plumbing, messages)
        return len(messages) / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def _settled(outcome: str) -> float:
    total = 0.0
    for kind in (IMAGE_INDEX, BUCKET_EVENT):
        total += metrics.REGISTRY.get_sample_value("ams_jobs_total", {"type": kind, "outcome": outcome}) or 0.0
    return total


async def _publish_and_wait(plumbing: Plumbing, messages: list[tuple[str, bytes, str]]) -> None:
    """Publish (type, body, content type) messages as an upstream system would, and wait until all are acked."""
    before, failed = _settled("succeeded"), _settled("dead_lettered") + _settled("retried")
    for message_type, body, content_type in messages:
        await plumbing.publisher.publish(
            message_type=message_type, body=body, message_id=str(uuid.uuid4()), content_type=content_type
        )
    while _settled("succeeded") - before < len(messages):
        if _settled("dead_lettered") + _settled("retried") > failed:
            raise RuntimeError("a benchmark message failed: see the processor's log lines above")
        await asyncio.sleep(0.01)


def broker_messages(photos: list[bytes], keys: list[str], bucket: str) -> tuple[list, list]:
    """N inline image.index messages and N R2 bucket events (objects already stored), as published."""
    inline = [
        (IMAGE_INDEX, encode(ImageIndexV1(data=data, image_id=str(uuid.uuid4()), source="bench")), MSGPACK)
        for data in photos
    ]
    events = [
        (
            BUCKET_EVENT,
            json.dumps({"action": "PutObject", "bucket": bucket, "object": {"key": key}}).encode(),
            JSON,
        )
        for key in keys
    ]
    return inline, events


@asynccontextmanager
async def broker_and_s3(root: str) -> AsyncIterator[dict[str, str]]:
    """A throwaway RabbitMQ node and S3 server (moto, its own process), as the tests start them."""
    from tests.support.rabbitmq import RabbitNode, free_port  # test tools: not needed with --no-broker
    from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Process

    workdir = Path(root) / "rabbitmq"
    workdir.mkdir()
    node = RabbitNode(workdir)
    node.start()
    s3 = S3Process(free_port())
    try:
        s3.create_bucket("bench")
        yield {
            "AMQP_URL": node.add_vhost("bench"),
            "R2_ENABLED": "1",
            "R2_ENDPOINT_URL": s3.endpoint,
            "R2_BUCKET_NAME": "bench",
            "R2_ACCESS_KEY_ID": ACCESS_KEY,
            "R2_SECRET_ACCESS_KEY": SECRET_KEY,
            "R2_REGION": "us-east-1",
        }
    finally:
        s3.stop()
        node.stop()


async def run(args: argparse.Namespace) -> None:
    placement = Placement.choose(args.device, args.dtype)
    device, dtype = placement.device, placement.dtype
    embedder = load_tower(args.model, device, dtype)
    photos = [photo(seed) for seed in range(args.images)]
    keys = [f"images/incoming/bench-{n}.jpg" for n in range(args.images)]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        env = {
            "LOCAL_STORAGE_DIR": f"{root}/storage",
            "IMAGE_SEARCH_DB_PATH": f"{root}/qdrant",
            "IMAGE_SEARCH_DB_BACKUP_ENABLED": "0",
            "LOG_LEVEL": "warning",
            "THUMBNAILS_AT_INDEX": "0" if args.no_thumbnails else "1",
        }
        async with AsyncExitStack() as stack:
            if not args.no_broker:
                env.update(await stack.enter_async_context(broker_and_s3(root)))
            settings = Settings.from_env(env)
            plumbing = None if args.no_broker else await Plumbing.open(settings)
            if plumbing is not None:
                stack.push_async_callback(plumbing.close)
            store = plumbing.store if plumbing is not None else await open_store(settings)
            opened = await open_image_index(settings, store, embedder.model_id, embedder.dim)
            stack.push_async_callback(opened.close)
            for key, data in zip(keys, photos, strict=True):
                await store.put(key, data, "image/jpeg")
            threads = settings.image_decode_threads
            side = settings.thumbnail_max_side if settings.thumbnails_at_index else None
            for batch in args.batch_sizes:
                bare = floor(embedder, device, batch, args.images)
                if plumbing is not None:
                    inline, events = broker_messages(photos, keys, plumbing.bucket)
                    index_rate = await through_broker(plumbing, embedder, opened.index, batch, threads, side, inline)
                    event_rate = await through_broker(plumbing, embedder, opened.index, batch, threads, side, events)
                else:
                    handler = bench_handler(store, opened.index, embedder, batch, threads, side)
                    inline_jobs = [
                        index_job(ImageIndexV1(data=data, image_id=str(uuid.uuid4()), source="bench"))
                        for data in photos
                    ]
                    in_place = [index_job(ImageIndexV1(key=key, source="bucket-event")) for key in keys]
                    index_rate = await through_handler(handler, inline_jobs, batch)
                    event_rate = await through_handler(handler, in_place, batch)
                rows.append((batch, bare, index_rate, event_rate))
                _report_row(*rows[-1])
    _report(args, device, dtype, rows)


def bench_handler(
    store: ObjectStore,
    index: VectorIndex,
    embedder: ClipEmbedder,
    batch: int,
    decode_threads: int,
    thumbnail_side: int | None,
    *,
    bucket: str = "bench",
) -> ImageIndexHandler:
    """The processor's image.index handler over the benchmark's store and index, with room for any number;
    thumbnails of `thumbnail_side` made at index time (None: none, THUMBNAILS_AT_INDEX=0)."""
    return ImageIndexHandler(
        store=store,
        index=index,
        embedder=embedder,
        bucket=bucket,
        batch_size=batch,
        max_pixels=MAX_PIXELS,
        max_bytes=1 << 30,
        max_elements=10_000_000,
        clock=UniqueClock(),
        thumbnail_side=thumbnail_side,
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
        f"{PATH_NO_BROKER if args.no_broker else PATH_BROKER}, "
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
    parser.add_argument(
        "--no-broker",
        action="store_true",
        help="drive the scheduler and batch function directly, with a local store (no RabbitMQ, no S3 server)",
    )
    parser.add_argument(
        "--no-thumbnails", action="store_true", help="THUMBNAILS_AT_INDEX=0: no thumbnails made while indexing"
    )
    args = parser.parse_args()
    configure_logging("warning", "console")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
