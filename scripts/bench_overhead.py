"""What the plumbing costs per request: a sync image generation through HTTP, RabbitMQ and the processor,
against the model call alone.

    RABBITMQ_PORT=5673 scripts/local-rabbitmq.sh start
    AMQP_URL=amqp://guest:guest@localhost:5673/ .venv/bin/python scripts/bench_overhead.py --runs 50
    RABBITMQ_PORT=5673 scripts/local-rabbitmq.sh stop

Use a broker no server is attached to: the benchmark runs its own processor on ams.jobs. It starts the product
in this process (MODEL_PROFILE=tiny unless the environment says otherwise; embedded store and Qdrant in a
temporary directory; image search off) and times, one request at a time:
    model        ImageGenerator.generate with the request's parameters, in a worker thread as the handler does
    end-to-end   POST /v1/images/generate over HTTP: validate, write the job record, publish (confirmed), consume,
                 generate, store the PNG, record the result, reply, answer with the PNG
The difference of the medians is what a request pays on top of the model. The HTTP client runs in the same
process and event loop as the server, so the end-to-end figure includes its work too (an upper bound).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import httpx
import uvicorn

from api.app import create_app
from infra.logging import configure_logging
from infra.settings import Settings
from launcher import OneProcess
from models.diffusion import GenerationParams

PROMPT = "A lighthouse on a cliff at dawn, oil painting"


def _listening_socket() -> socket.socket:
    """Bound and listening before uvicorn runs, so requests cannot race its start-up. The protocol is given
    explicitly: asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets, and without it every response waits
    ~40 ms for a delayed ACK."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    return listener


async def _timed(runs: int, warmup: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _settings(scratch: str) -> Settings:
    env = {
        "MODEL_PROFILE": "tiny",
        **os.environ,
        "IMAGE_ENABLED": "1",
        "IMAGE_SEARCH_ENABLED": "0",
        "VOICE_ENABLED": "0",
        "R2_ENABLED": "0",
        "LOCAL_STORAGE_DIR": os.path.join(scratch, "storage"),
        "IMAGE_SEARCH_DB_PATH": os.path.join(scratch, "qdrant"),
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "console",
    }
    return Settings.from_env(env)


async def bench(runs: int, warmup: int, width: int, height: int, steps: int) -> list[tuple[str, list[float]]]:
    with tempfile.TemporaryDirectory(prefix="ams-bench-") as scratch:
        settings = _settings(scratch)
        configure_logging(settings.log_level, settings.log_format)
        running = await OneProcess.start(settings)
        listener = _listening_socket()
        port = listener.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(create_app(running.services), log_config=None, access_log=False, lifespan="off")
        )
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        try:
            generator = running.processor.runtime.generator if running.processor is not None else None
            if generator is None:
                raise SystemExit("the image model did not load")
            params = GenerationParams(PROMPT, None, width, height, steps, settings.image_default_guidance, 42)
            body = {"prompt": PROMPT, "seed": 42, "width": width, "height": height, "steps": steps}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:

                async def request() -> None:
                    response = await client.post("/v1/images/generate", json=body)
                    response.raise_for_status()

                model = await _timed(runs, warmup, lambda: asyncio.to_thread(generator.generate, params))
                end_to_end = await _timed(runs, warmup, request)
            return [("model", model), ("end-to-end", end_to_end)]
        finally:
            server.should_exit = True
            await serving
            await running.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed requests per measurement (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests first (default 3)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    results = asyncio.run(bench(args.runs, args.warmup, args.width, args.height, args.steps))
    out = sys.stdout
    out.write(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{args.width}x{args.height}, {args.steps} steps, {args.runs} runs after {args.warmup} warm-up\n"
    )
    out.write(f"{'':12} {'median ms':>10} {'p95 ms':>10} {'min ms':>10}\n")
    for name, samples in results:
        median, p95 = statistics.median(samples), statistics.quantiles(samples, n=20)[18]
        out.write(f"{name:12} {median:10.1f} {p95:10.1f} {min(samples):10.1f}\n")
    (_, model), (_, end_to_end) = results
    out.write(
        f"overhead per request (median difference): {statistics.median(end_to_end) - statistics.median(model):.1f} ms\n"
    )


if __name__ == "__main__":
    main()
