"""Load test: N concurrent clients for S seconds against a running server, a mix of reads, searches, uploads,
generations and bad requests; reports per-route counts, statuses and latency, every 5xx, and the server's
resident memory over the run. Exits 1 if any answer was a 5xx or a connection failed.

    MODEL_PROFILE=tiny IMAGE_ENABLED=1 ./scripts/run.sh &          # the server, on :8000
    .venv/bin/python bench/load.py --clients 50 --seconds 60 --pid "$(pgrep -f 'python -m launcher')"

Not part of the test suite (docs/operations.md has the figures of a run).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from PIL import Image

QUERIES = ["a cat", "고양이", "un chien", "赤い車", "mountain at dusk", "ein Haus", "плакат", "beach"]


def png(rng: random.Random) -> bytes:
    image = Image.new("RGB", (48, 32), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


Call = Callable[[httpx.AsyncClient, random.Random], Awaitable[httpx.Response]]

# route name -> (weight, the request)
MIX: dict[str, tuple[int, Call]] = {
    "GET /healthz": (10, lambda c, r: c.get("/healthz")),
    "GET /v1/images": (20, lambda c, r: c.get("/v1/images", params={"limit": 20})),
    "POST /v1/images/search": (
        25,
        lambda c, r: c.post("/v1/images/search", json={"query": r.choice(QUERIES), "limit": 5}),
    ),
    "POST /v1/images": (10, lambda c, r: c.post("/v1/images", files={"file": ("l.png", png(r), "image/png")})),
    "POST /v1/images/generate": (
        5,
        lambda c, r: c.post("/v1/images/generate", json={"prompt": r.choice(QUERIES), "seed": r.randrange(1000)}),
    ),
    "GET /v1/jobs/{unknown}": (10, lambda c, r: c.get(f"/v1/jobs/{uuid.uuid4()}")),
    "POST /v1/images/search (malformed)": (
        10,
        lambda c, r: c.post("/v1/images/search", content=b'{"query": ', headers={"content-type": "application/json"}),
    ),
    "GET /metrics": (10, lambda c, r: c.get("/metrics")),
}


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


async def client_loop(
    url: str,
    deadline: float,
    seed: int,
    latencies: dict[str, list[float]],
    statuses: dict[str, Counter[int]],
    failures: list[str],
) -> None:
    rng = random.Random(seed)
    names = list(MIX)
    weights = [MIX[name][0] for name in names]
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            started = time.perf_counter()
            try:
                response = await MIX[name][1](client, rng)
            except httpx.HTTPError as exc:
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            latencies[name].append(time.perf_counter() - started)
            statuses[name][response.status_code] += 1
            if response.status_code >= 500:
                failures.append(f"{name}: {response.status_code} {response.text[:200]}")


async def run(url: str, clients: int, seconds: float, pid: int | None) -> int:
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    failures: list[str] = []
    rss = [rss_mb(pid)]
    deadline = time.monotonic() + seconds
    workers = [
        asyncio.create_task(client_loop(url, deadline, seed, latencies, statuses, failures)) for seed in range(clients)
    ]
    while not all(worker.done() for worker in workers):
        await asyncio.sleep(1)
        rss.append(rss_mb(pid))
    await asyncio.gather(*workers)
    rss.append(rss_mb(pid))
    total = sum(sum(counter.values()) for counter in statuses.values())
    report = {
        "clients": clients,
        "seconds": seconds,
        "requests": total,
        "per_second": round(total / seconds, 1),
        "server_errors": sum(1 for failure in failures if ": 5" in failure),
        "connection_failures": sum(1 for failure in failures if ": 5" not in failure),
        "rss_mb": None if pid is None else {"start": rss[0], "end": rss[-1], "max": max(v for v in rss if v)},
    }
    width = max(len(name) for name in MIX)
    lines = [f"{'route':<{width}}  {'count':>6}  {'p50 ms':>8}  {'p99 ms':>8}  statuses"]
    for name in MIX:
        times = sorted(latencies[name])
        if not times:
            continue
        p50 = statistics.median(times) * 1000
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
        codes = ", ".join(f"{code}: {count}" for code, count in sorted(statuses[name].items()))
        lines.append(f"{name:<{width}}  {len(times):>6}  {p50:>8.1f}  {p99:>8.1f}  {codes}")
    sys.stdout.write("\n".join(lines) + "\n" + json.dumps(report, indent=2) + "\n")
    for failure in failures[:20]:
        sys.stdout.write(f"failure: {failure}\n")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--pid", type=int, default=None, help="the server process, for its memory (RSS)")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(run(args.url.rstrip("/"), args.clients, args.seconds, args.pid)))


if __name__ == "__main__":
    main()
