"""The image index, measured through the product's own VectorIndex, beside the floors measured in the same run.

    .venv/bin/python bench/vectors.py                       # 50,000 x 768: embedded engine, local mode, floors
    .venv/bin/python bench/vectors.py --points 1000000 --skip-local --build-points 0   # on demand: 1M
    RABBITMQ_PORT=5673 scripts/local-rabbitmq.sh start
    AMQP_URL=amqp://guest:guest@localhost:5673/ .venv/bin/python bench/vectors.py --http-only
    RABBITMQ_PORT=5673 scripts/local-rabbitmq.sh stop

Random unit vectors (CLIP embeddings cost the index what real ones cost), ids and records like the server's.
What is timed:
    embedded      infra.vectors EdgeIndex (the default): the engine process, its socket, automatic graph builds
    local mode    qdrant-client's local mode through the same interface (the embedded store before Qdrant Edge)
    floors        NumPy brute force over the same matrix, and qdrant_edge called directly in this process (no
                  engine process, no socket) on the same data and, for search, on the same built shard
    http          POST /v1/images/search against `python -m launcher` (tiny CLIP, 32 dimensions) over the same number
                  of points, with the tiny text tower's own time as its floor
Searches are top-10, one at a time after 20 warm-up calls; "newest 100" is the listing's query.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.cpu import share_cpu_politely  # noqa: E402
from infra.logging import configure_logging  # noqa: E402
from infra.vectors import ImageRecord, VectorIndex  # noqa: E402
from infra.vectors.edge.client import EdgeIndex  # noqa: E402
from infra.vectors.edge.layout import EngineLayout  # noqa: E402
from infra.vectors.server import QdrantServerIndex  # noqa: E402

BATCH = 64
MODEL = "bench-model"


def _records(count: int) -> list[ImageRecord]:
    records = []
    for step in range(count):
        image_id = str(uuid.UUID(int=step + 1))
        records.append(
            ImageRecord(
                id=image_id,
                r2_key=f"images/originals/{image_id}.jpg",
                content_type="image/jpeg" if step % 3 else "image/png",
                size=100_000,
                width=1024,
                height=768,
                created_at="2026-11-26T00:00:00Z",
                created_us=1_790_000_000_000_000 + step,
                source="upload" if step % 2 else "bucket",
                filename=f"photo-{step}.jpg",
            )
        )
    return records


def _vectors(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):
        block = rng.standard_normal((min(100_000, count - start), dim)).astype(np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] * 1000, ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000


async def _timed(count: int, call: Callable[[int], Awaitable[object]], warmup: int = 20) -> tuple[float, float]:
    for step in range(warmup):
        await call(step)
    samples = []
    for step in range(count):
        started = time.perf_counter()
        await call(step)
        samples.append(time.perf_counter() - started)
    return _percentiles(samples)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _upsert_all(index: VectorIndex, records: list[ImageRecord], vectors: np.ndarray) -> float:
    started = time.perf_counter()
    for start in range(0, len(records), BATCH):
        await index.upsert(list(zip(records[start : start + BATCH], vectors[start : start + BATCH], strict=True)))
    return time.perf_counter() - started


async def settle(index: EdgeIndex) -> None:
    """Wait for the graph builds, then build whatever still waits outside the graph."""
    waiting = None
    while True:
        await index.build_graph(wait=True)
        stats = await index.stats()
        if stats.building:
            continue
        if stats.points - stats.indexed_points in (0, waiting):
            return
        waiting = stats.points - stats.indexed_points


async def measure_index(
    name: str,
    opener: Callable[[], Awaitable[VectorIndex]],
    records: list[ImageRecord],
    vectors: np.ndarray,
    queries: list[np.ndarray],
    *,
    searches: int,
    lists: int,
) -> dict[str, object]:
    figures: dict[str, object] = {}
    index = await opener()
    await index.ensure_collection(MODEL, vectors.shape[1])
    figures["upsert_s"] = await _upsert_all(index, records, vectors)
    print(f"  {name}: upserted {len(records)} in {figures['upsert_s']:.1f} s", file=sys.stderr, flush=True)
    if isinstance(index, EdgeIndex):
        started = time.perf_counter()
        await settle(index)
        stats = await index.stats()
        figures["built_after_s"] = time.perf_counter() - started
        figures["last_build"] = stats.last_build
        figures["disk_mb"] = (stats.disk_bytes or 0) / 2**20
        figures["engine_rss_mb"] = _rss_mb(index.engine_pid) if index.engine_pid else float("nan")
        print(f"  {name}: graph complete {figures['built_after_s']:.1f} s later", file=sys.stderr, flush=True)
    figures["search_ms"] = await _timed(searches, lambda step: index.search(queries[step % len(queries)], 10))
    figures["newest_ms"] = await _timed(lists, lambda _step: index.newest(100), warmup=3)
    await index.close()
    started = time.perf_counter()
    index = await opener()
    await index.ensure_collection(MODEL, vectors.shape[1])
    await index.count()
    figures["reopen_s"] = time.perf_counter() - started
    await index.close()
    return figures


def direct_edge(
    path: Path | None,
    records: list[ImageRecord],
    vectors: np.ndarray,
    queries: list[np.ndarray],
    searches: int,
    live_shard: Path,
) -> dict[str, object]:
    """qdrant_edge in this process: the engine's own cost, without our process, socket and encoding."""
    import msgspec
    from qdrant_edge import (
        CountRequest,
        Direction,
        EdgeShard,
        OrderBy,
        Point,
        Query,
        QueryRequest,
        ScrollRequest,
        UpdateOperation,
    )

    from infra.vectors.edge.shard import create_shard

    figures: dict[str, object] = {"upsert_s": None}
    if path is not None:
        shard = create_shard(path, vectors.shape[1], 10_000)
        started = time.perf_counter()
        for start in range(0, len(records), BATCH):
            rows = vectors[start : start + BATCH].tolist()
            points = [
                Point(id=record.id, vector=row, payload=msgspec.to_builtins(record))
                for row, record in zip(rows, records[start : start + BATCH], strict=True)
            ]
            shard.update(UpdateOperation.upsert_points(points))
        figures["upsert_s"] = time.perf_counter() - started
        shard.close()
    shard = EdgeShard.load(str(live_shard))  # the product's built shard, as the engine left it
    samples = []
    for step in range(searches + 20):
        started = time.perf_counter()
        shard.query(QueryRequest(limit=10, query=Query.Nearest(queries[step % len(queries)]), with_payload=True))
        if step >= 20:
            samples.append(time.perf_counter() - started)
    figures["search_ms"] = _percentiles(samples)
    samples = []
    for _ in range(50):
        started = time.perf_counter()
        shard.scroll(ScrollRequest(limit=100, with_payload=True, order_by=OrderBy("created_us", Direction.Desc)))
        samples.append(time.perf_counter() - started)
    figures["newest_ms"] = _percentiles(samples)
    assert shard.count(CountRequest(exact=True)) == len(records)
    shard.close()
    started = time.perf_counter()
    EdgeShard.load(str(live_shard)).close()
    figures["reopen_s"] = time.perf_counter() - started
    return figures


def numpy_floor(vectors: np.ndarray, queries: list[np.ndarray], searches: int) -> tuple[float, float]:
    samples = []
    for step in range(searches):
        started = time.perf_counter()
        scores = vectors @ queries[step % len(queries)]
        top = np.argpartition(-scores, 10)[:10]
        top[np.argsort(-scores[top])]
        samples.append(time.perf_counter() - started)
    return _percentiles(samples)


async def measure_http(points: int, workdir: Path, requests: int) -> dict[str, object]:
    """POST /v1/images/search against the product's own process, tiny CLIP, `points` records."""
    import httpx

    from infra.settings import Settings
    from models.clip import ClipEmbedder
    from models.tiny import clip as tiny_clip

    amqp = os.environ.get("AMQP_URL")
    if not amqp:
        raise SystemExit("--http needs AMQP_URL: a RabbitMQ node (see the usage at the top of this file)")
    env = {
        **os.environ,
        "MODEL_PROFILE": "tiny",
        "MODEL_CACHE_DIR": str(workdir / "models"),
        "IMAGE_ENABLED": "0",
        "IMAGE_SEARCH_DB_PATH": str(workdir / "http-index"),
        "LOCAL_STORAGE_DIR": str(workdir / "storage"),
        "LOG_LEVEL": "warning",
        "PROCESSOR_METRICS_PORT": "0",
    }
    settings = Settings.from_env(env)
    clip = ClipEmbedder.load(settings)
    index = await EdgeIndex.open(settings.image_search_db_path, "images", log_level="warning")
    await index.ensure_collection(tiny_clip.MODEL_ID, clip.dim)
    await _upsert_all(index, _records(points), _vectors(points, clip.dim, seed=1))
    await settle(index)
    await index.close()
    embed = []
    for _ in range(requests):
        started = time.perf_counter()
        clip.embed_texts(["a red bicycle leaning on a wall"])
        embed.append(time.perf_counter() - started)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "launcher",
        env={**env, "HOST": "127.0.0.1", "PORT": str(port)},
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(600):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
            body = {"query": "a red bicycle leaning on a wall", "limit": 10}
            search = await _timed(requests, lambda _step: client.post("/v1/images/search", json=body))
    finally:
        server.terminate()
        await server.wait()  # the server stops its engine before it exits
    return {"search_ms": search, "embed_ms": _percentiles(embed)}


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.machine()}"
    )


def _ms(pair: object) -> str:
    p50, p99 = pair  # type: ignore[misc]
    return f"{p50:.2f} / {p99:.2f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the image index.")
    parser.add_argument("--points", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--searches", type=int, default=500)
    parser.add_argument("--skip-local", action="store_true", help="leave out qdrant-client's local mode")
    parser.add_argument(
        "--build-points",
        type=int,
        default=10_000,
        help="IMAGE_SEARCH_INDEX_BUILD_POINTS for the embedded index (0: one graph build after the last upsert)",
    )
    parser.add_argument("--http", action="store_true", help="also time POST /v1/images/search (needs AMQP_URL)")
    parser.add_argument("--http-only", action="store_true", help="only the HTTP figure (needs AMQP_URL)")
    parser.add_argument("--workdir", type=Path, help="where the indexes go (default: a temporary directory)")
    args = parser.parse_args()
    share_cpu_politely()  # as the server's processes do, before torch loads (the HTTP part embeds queries here)
    configure_logging("warning", "console")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-vectors-"))
    print(f"# bench/vectors.py: {args.points} points x {args.dim} dimensions", flush=True)
    print(f"machine: {machine()}", flush=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    try:
        if not args.http_only:
            await _index_table(args, workdir)
        if args.http or args.http_only:
            http = await measure_http(args.points, workdir, requests=500)
            figure = _ms(http["search_ms"])
            print(f"\nHTTP, tiny CLIP, {args.points} points: POST /v1/images/search p50 / p99 {figure} ms;")
            print(f"the tiny text tower alone (its floor) {_ms(http['embed_ms'])} ms")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


async def _index_table(args: argparse.Namespace, workdir: Path) -> None:
    records = _records(args.points)
    vectors = _vectors(args.points, args.dim)
    queries = list(_vectors(200, args.dim, seed=99))
    print(f"  {args.points} vectors ready", file=sys.stderr, flush=True)
    client_rss_before = _rss_mb(os.getpid())

    async def open_edge() -> VectorIndex:
        return await EdgeIndex.open(workdir / "edge", "images", build_points=args.build_points, log_level="warning")

    edge = await measure_index("embedded", open_edge, records, vectors, queries, searches=args.searches, lists=200)
    live = EngineLayout.under(workdir / "edge", "images")
    floor_path = workdir / "direct" if args.points <= 200_000 else None  # the in-process upsert floor is for 50k
    direct = direct_edge(floor_path, records, vectors, queries, args.searches, live.shard_path(live.read_meta().shard))
    brute = numpy_floor(vectors, queries, 100)
    local = None
    if not args.skip_local:

        async def open_local() -> VectorIndex:
            return QdrantServerIndex.local(str(workdir / "local"), "images")

        local = await measure_index("local mode", open_local, records, vectors, queries, searches=100, lists=20)

    build = edge["last_build"] or {}
    rows = [
        (
            "upsert, batches of 64 (s)",
            f"{edge['upsert_s']:.1f}",
            local and f"{local['upsert_s']:.1f}",
            "not run" if direct["upsert_s"] is None else f"{direct['upsert_s']:.1f}",
        ),
        (
            "search top-10 p50 / p99 (ms)",
            _ms(edge["search_ms"]),
            local and _ms(local["search_ms"]),
            _ms(direct["search_ms"]),
        ),
        (
            "newest 100 p50 / p99 (ms)",
            _ms(edge["newest_ms"]),
            local and _ms(local["newest_ms"]),
            _ms(direct["newest_ms"]),
        ),
        ("reopen (s)", f"{edge['reopen_s']:.2f}", local and f"{local['reopen_s']:.2f}", f"{direct['reopen_s']:.2f}"),
    ]
    print("\n| | embedded (Qdrant Edge engine) | qdrant-client local mode | floor: qdrant_edge in-process |")
    print("|---|---|---|---|")
    for label, ours, theirs, floor in rows:
        print(f"| {label} | {ours} | {theirs or 'not run'} | {floor} |")
    p99_ratio = edge["search_ms"][1] / direct["search_ms"][1]  # type: ignore[index]
    print(
        f"\nsearch p99 through the engine process = {p99_ratio:.2f} x the in-process floor; NumPy brute force "
        f"over the same matrix p50 / p99 {_ms(brute)} ms"
    )
    print(
        f"graph complete {edge['built_after_s']:.1f} s after the last upsert; last build: "
        f"{build.get('build_seconds')} s building, {build.get('swap_seconds')} s swapping in "
        f"({build.get('replayed_writes')} writes replayed)"
    )
    print(
        f"engine process RSS {edge['engine_rss_mb']:.0f} MB, index on disk {edge['disk_mb']:.0f} MB; "
        f"this process {_rss_mb(os.getpid()):.0f} MB (of which the benchmark's vectors "
        f"{vectors.nbytes / 2**20:.0f} MB; {client_rss_before:.0f} MB before the runs)"
    )


if __name__ == "__main__":
    asyncio.run(main())
