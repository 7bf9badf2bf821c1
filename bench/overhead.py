"""What the plumbing costs per interactive request: generate, voice and upload through HTTP, RabbitMQ and the
processor, against the model call of the same request.

    .venv/bin/python -m bench.overhead [--runs 40] [--warmup 5] [--paths generate,voice,stream,upload] [--breakdown]

It starts a throwaway RabbitMQ node (or uses AMQP_URL), the product in this process as `scripts/run.sh` runs it
(one process, embedded object store and index in a temporary directory, MODEL_PROFILE=tiny unless the environment
says otherwise), and an HTTP client in a second process (keep-alive, one request at a time), so the client's own
work is not counted against the server. For each request it takes the time of the model call the processor made
for it (ImageGenerator.generate, VoiceCloner.clone, ClipEmbedder.embed_prepared) and reports

    model      the model calls
    request    the client's time from sending the request to the last byte of the answer
    overhead   request minus model, request by request: everything the request pays on top of the model

as median and p95 over --runs requests after --warmup untimed ones. Paths:

    generate   POST /v1/images/generate, 64x64, 2 steps: the PNG
    voice      POST /v1/voice/generate, a 2 s WAV clip and one sentence: the MP3
    stream     the same with three sentences, `Accept: audio/mpeg` and ?stream=true: time to the first byte
               against the synthesis of the first sentence (the model call's start to its first piece)
    upload     POST /v1/images (wait=true), a 640x480 JPEG: the image record once it is searchable

In the same run it measures the floor under all of this: one request and reply through the same RabbitMQ node
alone (a persistent message published with confirms and priority, consumed, answered on a reply queue, the
answer consumed; aio-pika in one event loop, as in the product), with the same pause between requests as the
path's model call, since a broker and an event loop that have been idle take longer to answer than busy ones;
and one flushed write on the disk the embedded store uses (4 KB staged, fsync, renamed into place, the folder
fsynced: what the store does for an indexed image's original and thumbnail before the answer, and for a
generated image's or voice's output and record after the answer, before the ack), same pause;
and the HTTP round trip alone (GET /healthz from the same client to the same server), same pause.

--breakdown adds, for each path, the time spent in each step of the request (job records, publishes, object
store writes and reads, reply) as the median over the requests, so the overhead can be traced to its parts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.client
import importlib
import io
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import wave
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from PIL import Image, ImageDraw

from infra.cpu import share_cpu_politely

PATHS = ("generate", "voice", "stream", "upload")
HTTP_FLOOR = "healthz"  # GET /healthz: the HTTP round trip through the same server, with nothing behind it
PROMPT = "A lighthouse on a cliff at dawn, oil painting"
SENTENCE = "The quick brown fox jumps over the lazy dog."
THREE_SENTENCES = "The first sentence is short. The second one follows it. And the third ends the text."
BOUNDARY = "ams-bench-boundary"
REPOSITORY = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the client (runs in its own process)


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, str, bytes]]) -> bytes:
    parts = []
    for name, value in fields.items():
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, content_type, data) in files.items():
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def reference_clip(seconds: float = 2.0, rate: int = 24000) -> bytes:
    """A WAV clip of a voice-like tone with vibrato (16-bit mono)."""
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (180 + 20 * np.sin(2 * np.pi * 3 * t)) * t)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((tone * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def photo(size: tuple[int, int] = (640, 480)) -> bytes:
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    ImageDraw.Draw(image).ellipse((100, 80, 400, 380), fill=(200, 60, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def _request_for(path: str) -> tuple[str, str, bytes, dict[str, str]]:
    """method-less request: URL, expected status, body, headers."""
    if path == HTTP_FLOOR:
        return "/healthz", "200", b"", {}
    if path == "generate":
        body = json.dumps({"prompt": PROMPT, "seed": 42, "width": 64, "height": 64, "steps": 2}).encode()
        return "/v1/images/generate", "200", body, {"Content-Type": "application/json"}
    if path in ("voice", "stream"):
        text = SENTENCE if path == "voice" else THREE_SENTENCES
        fields = {"text": text, "ref_text": "A reference clip.", "language": "English"}
        body = _multipart(fields, {"ref_audio": ("ref.wav", "audio/wav", reference_clip())})
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        if path == "stream":
            return "/v1/voice/generate?stream=true", "200", body, {**headers, "Accept": "audio/mpeg"}
        return "/v1/voice/generate", "200", body, headers
    body = _multipart({}, {"file": ("photo.jpg", "image/jpeg", photo())})
    return "/v1/images?wait=true", "201", body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def client(port: int, path: str, count: int, pause: float) -> None:
    """Send `count` requests one after another on one keep-alive connection, `pause` seconds apart; print one JSON
    line per request: [sent, first byte of the body, last byte], in seconds of time.perf_counter (CLOCK_MONOTONIC on
    Linux, the same clock in every process, so the server's steps can be placed on the request's timeline)."""
    url, expected, body, headers = _request_for(path)
    method = "GET" if path == HTTP_FLOOR else "POST"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.connect()
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(count):
        started = time.perf_counter()
        connection.request(method, url, body=body, headers=headers)
        response = connection.getresponse()
        first = response.read(1)
        first_at = time.perf_counter()
        rest = response.read()
        done = time.perf_counter()
        if str(response.status) != expected or not first:
            raise SystemExit(f"{path}: HTTP {response.status}: {(first + rest)[:500]!r}")
        sys.stdout.write(json.dumps([started, first_at, done]) + "\n")
        sys.stdout.flush()
        time.sleep(pause)


# ---------------------------------------------------------------- the server side


@dataclass
class Spans:
    """Time spent in wrapped calls, and the starts and first pieces of the model calls."""

    calls: list[tuple[str, float, float]] = field(default_factory=list)
    model: list[float] = field(default_factory=list)
    first_piece: list[float] = field(default_factory=list)

    def clear(self) -> None:
        self.calls.clear()
        self.model.clear()
        self.first_piece.clear()


def _timed(spans: Spans, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(function):

        @functools.wraps(function)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                spans.calls.append((name, started, time.perf_counter()))

        return timed_async

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spans.calls.append((name, started, time.perf_counter()))

    return timed


def _model_call(spans: Spans, function: Callable[..., Any]) -> Callable[..., Any]:
    """The model call, timed; for the voice model also the time to its first piece (streaming)."""

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        on_piece = kwargs.get("on_piece")
        if on_piece is not None:

            def first_piece(*piece_args: Any) -> Any:
                spoken = time.perf_counter()
                if len(spans.first_piece) < len(spans.model) + 1:
                    spans.first_piece.append((spoken - started) * 1000)
                spans.calls.append(("MODEL: a piece spoken", spoken, spoken))
                return on_piece(*piece_args)

            kwargs["on_piece"] = first_piece
        try:
            return function(*args, **kwargs)
        finally:
            ended = time.perf_counter()
            spans.model.append((ended - started) * 1000)
            spans.calls.append(("MODEL", started, ended))

    return timed


# functions looked up by name when called, timed with --breakdown
STEP_FUNCTIONS = (
    ("api.routes.generate", ("strict_json", "finished_result")),
    ("processor.consumer", ("decode_job",)),
    ("api.routes.voice", ("check_audio",)),
    ("api.routes.images", ("check_image",)),
    ("processor.handlers.voice_generate", ("decode_audio",)),
    ("processor.handlers.image_index", ("prepare_image",)),
)


def instrument(running: Any, spans: Spans, breakdown: bool) -> None:
    """Time the model calls of this product instance; with `breakdown`, also the plumbing's steps."""
    runtime = running.processor.runtime
    runtime.generator.generate = _model_call(spans, runtime.generator.generate)
    runtime.voice.clone = _model_call(spans, runtime.voice.clone)
    runtime.clip.embed_prepared = _model_call(spans, runtime.clip.embed_prepared)
    if not breakdown:
        return
    from api.replies import ReplyListener
    from contract.jobs import JobStore
    from contract.mp3 import Mp3File
    from infra.broker import Publisher
    from processor.consumer import Consumer

    for owner, names in (
        (JobStore, ("create", "load", "update")),
        (Publisher, ("publish", "reply", "reply_piece")),
        (Consumer, ("_on_message",)),
        (ReplyListener, ("_on_reply",)),
        (Mp3File, ("write", "finish")),
    ):
        for name in names:
            if hasattr(owner, name):
                setattr(owner, name, _timed(spans, f"{owner.__name__}.{name}", getattr(owner, name)))
    store = running.plumbing.store
    for name in ("put", "get", "exists"):
        setattr(store, name, _timed(spans, f"store.{name}", getattr(store, name)))
    index = runtime.index
    for name in ("upsert", "get_many", "count"):
        setattr(index, name, _timed(spans, f"index.{name}", getattr(index, name)))
    for module_name, names in STEP_FUNCTIONS:
        module = importlib.import_module(module_name)
        for name in names:
            setattr(module, name, _timed(spans, f"{module_name.rsplit('.', 1)[-1]}.{name}", getattr(module, name)))


def _settings(scratch: str, amqp_url: str) -> Any:
    from infra.settings import Settings

    env = {
        "MODEL_PROFILE": "tiny",
        **os.environ,
        "AMQP_URL": amqp_url,
        "IMAGE_ENABLED": "1",
        "VOICE_ENABLED": "1",
        "IMAGE_SEARCH_ENABLED": "1",
        "R2_ENABLED": "0",
        "LOCAL_STORAGE_DIR": os.path.join(scratch, "storage"),
        "IMAGE_SEARCH_DB_PATH": os.path.join(scratch, "qdrant"),
        "RATE_LIMIT_PER_MINUTE": "0",
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "warning"),
        "LOG_FORMAT": "json",
    }
    return Settings.from_env(env)


@contextlib.contextmanager
def broker(scratch: str) -> Iterator[str]:
    """AMQP_URL if set, else a throwaway RabbitMQ node (the test suite's recipe)."""
    if os.environ.get("AMQP_URL"):
        yield os.environ["AMQP_URL"]
        return
    from tests.support.rabbitmq import RabbitNode

    workdir = Path(scratch) / "rabbitmq"
    workdir.mkdir()
    node = RabbitNode(workdir)
    node.start()
    try:
        yield node.add_vhost("bench")
    finally:
        node.stop()


@contextlib.asynccontextmanager
async def serving(settings: Any) -> AsyncIterator[tuple[Any, int]]:
    """The product in this process, listening on a free loopback port."""
    from api.app import create_app
    from infra.http_protocol import HttpLimits
    from infra.http_server import server_config
    from infra.logging import configure_logging
    from launcher import OneProcess

    configure_logging(settings.log_level, settings.log_format)
    running = await OneProcess.start(settings)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    # the server the product runs (server_config), on a socket bound before it starts, so no request races it
    config = server_config(create_app(running.services), "127.0.0.1", 0, HttpLimits.from_settings(settings))
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        yield running, listener.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        await running.stop()


async def _run_client(port: int, path: str, count: int, pause: float = 0.0) -> list[tuple[float, float, float]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.overhead",
        "--client",
        f"{port}:{path}:{count}:{pause}",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPOSITORY,
    )
    output, _ = await process.communicate()
    if process.returncode:
        raise SystemExit(f"the {path} client failed (exit {process.returncode})")
    return [tuple(json.loads(line)) for line in output.decode().splitlines()]


async def queue_floor(amqp_url: str, pause_seconds: float, runs: int) -> list[float]:
    """Milliseconds per request and reply through RabbitMQ alone, with `pause_seconds` between requests."""
    import aio_pika

    connection = await aio_pika.connect_robust(amqp_url)
    try:
        requests = await connection.channel(publisher_confirms=True)
        replies = await connection.channel(publisher_confirms=False)
        work = await requests.declare_queue("", exclusive=True, arguments={"x-max-priority": 9})
        answers = await requests.declare_queue("", exclusive=True)
        waiting: dict[str, asyncio.Future[float]] = {}

        async def answer(message: Any) -> None:
            reply = aio_pika.Message(b"reply", correlation_id=message.correlation_id)
            await replies.default_exchange.publish(reply, routing_key=message.reply_to)
            await message.ack()

        async def answered(message: Any) -> None:
            waiting.pop(message.correlation_id).set_result(time.perf_counter())

        await work.consume(answer)
        await answers.consume(answered, no_ack=True)
        samples = []
        for number in range(runs + 5):
            waiting[str(number)] = done = asyncio.get_running_loop().create_future()
            started = time.perf_counter()
            message = aio_pika.Message(
                b"x" * 256,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                priority=9,
                correlation_id=str(number),
                reply_to=answers.name,
            )
            await requests.default_exchange.publish(message, routing_key=work.name)
            samples.append((await done - started) * 1000)
            await asyncio.sleep(pause_seconds)
        return samples[5:]
    finally:
        await connection.close()


def write_floor(directory: str, pause_seconds: float, runs: int) -> list[float]:
    """Milliseconds per flushed 4 KB write into `directory` (staged, fsync, renamed, the folder fsynced),
    `pause_seconds` apart."""
    samples = []
    for number in range(runs + 5):
        started = time.perf_counter()
        descriptor, staged = tempfile.mkstemp(dir=directory)
        with os.fdopen(descriptor, "wb") as staging:
            staging.write(b"x" * 4096)
            staging.flush()
            os.fsync(staging.fileno())
        os.replace(staged, os.path.join(directory, f"written-{number}"))
        folder = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        samples.append((time.perf_counter() - started) * 1000)
        time.sleep(pause_seconds)
    return samples[5:]


@dataclass
class PathResult:
    path: str
    model: list[float]
    first_byte: list[float]
    request: list[float]
    first_piece: list[float]
    steps: dict[str, tuple[float, float]]  # step -> (mean ms per request, calls per request)
    timeline: list[tuple[str, float, float]]  # the steps of the request with the median overhead, ms from its start
    floor: list[float] = field(default_factory=list)  # RabbitMQ request and reply alone, same pause
    write: list[float] = field(default_factory=list)  # one flushed write on the store's disk, same pause
    http: list[float] = field(default_factory=list)  # GET /healthz through the same server, same pause

    @property
    def overhead(self) -> list[float]:
        return [request - model for request, model in zip(self.request, self.model, strict=True)]

    @property
    def first_byte_overhead(self) -> list[float]:
        return [first - piece for first, piece in zip(self.first_byte, self.first_piece, strict=True)]


def _steps(spans: Spans, runs: int) -> dict[str, tuple[float, float]]:
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for name, started, ended in spans.calls:
        if not name.startswith("MODEL"):
            totals[name] += (ended - started) * 1000
            counts[name] += 1
    return {name: (totals[name] / runs, counts[name] / runs) for name in sorted(totals, key=lambda n: -totals[n])}


def _timeline(spans: Spans, request: tuple[float, float, float]) -> list[tuple[str, float, float]]:
    sent, first, done = request
    steps = [
        (name, (started - sent) * 1000, (ended - sent) * 1000)
        for name, started, ended in spans.calls
        if sent <= started <= done
    ]
    return sorted(
        [
            *steps,
            ("first byte at the client", (first - sent) * 1000, 0.0),
            ("answer read by the client", (done - sent) * 1000, 0.0),
        ],
        key=lambda step: step[1],
    )


async def measure(port: int, spans: Spans, path: str, runs: int, warmup: int) -> PathResult:
    await _run_client(port, path, warmup)
    spans.clear()
    timings = await _run_client(port, path, runs)
    if len(spans.model) != runs:
        raise SystemExit(f"{path}: {len(spans.model)} model calls for {runs} requests")
    requests = [(last - sent) * 1000 for sent, _, last in timings]
    overhead = [request - model for request, model in zip(requests, spans.model, strict=True)]
    middle = sorted(range(runs), key=overhead.__getitem__)[runs // 2]
    return PathResult(
        path=path,
        model=list(spans.model),
        first_byte=[(first - sent) * 1000 for sent, first, _ in timings],
        request=requests,
        first_piece=list(spans.first_piece) if path == "stream" else [],
        steps=_steps(spans, runs),
        timeline=_timeline(spans, timings[middle]),
    )


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20, method="inclusive")[18]


def report(results: list[PathResult], args: argparse.Namespace) -> None:
    out = sys.stdout
    out.write(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"MODEL_PROFILE={os.environ.get('MODEL_PROFILE', 'tiny')}; {args.runs} requests per path after "
        f"{args.warmup} warm-up\n\n"
    )
    out.write(
        "| path | model median | request median | overhead median | overhead p95 | RabbitMQ alone median | p95 "
        "| flushed write median | HTTP alone median |\n"
    )
    out.write("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for result in results:
        out.write(
            f"| {result.path} | {statistics.median(result.model):.1f} ms | {statistics.median(result.request):.1f} ms"
            f" | {statistics.median(result.overhead):.1f} ms | {p95(result.overhead):.1f} ms"
            f" | {statistics.median(result.floor):.1f} ms | {p95(result.floor):.1f} ms"
            f" | {statistics.median(result.write):.2f} ms | {statistics.median(result.http):.2f} ms |\n"
        )
    for result in results:
        if result.first_piece:
            out.write(
                f"\nstream: first piece synthesized after {statistics.median(result.first_piece):.1f} ms (median); "
                f"first byte at the client after {statistics.median(result.first_byte):.1f} ms; first byte minus "
                f"first piece: median {statistics.median(result.first_byte_overhead):.1f} ms, "
                f"p95 {p95(result.first_byte_overhead):.1f} ms\n"
            )
    if args.breakdown:
        for result in results:
            out.write(f"\n{result.path}: time in each step per request (mean ms, calls)\n")
            for name, (ms, calls) in result.steps.items():
                out.write(f"    {name:28} {ms:7.2f} ms  x{calls:g}\n")
            out.write(f"{result.path}: the request with the median overhead, ms from sending it (start, end)\n")
            for name, started, ended in result.timeline:
                out.write(f"    {name:28} {started:8.2f} {f'{ended:8.2f}' if ended else ''}\n")


async def run(args: argparse.Namespace) -> list[PathResult]:
    with tempfile.TemporaryDirectory(prefix="ams-overhead-") as scratch, broker(scratch) as amqp_url:
        settings = _settings(scratch, amqp_url)
        written = os.path.join(scratch, "flushed-writes")
        os.mkdir(written)
        spans = Spans()
        async with serving(settings) as (running, port):
            instrument(running, spans, args.breakdown)
            results = []
            for path in args.paths:
                result = await measure(port, spans, path, args.runs, args.warmup)
                pause = statistics.median(result.model) / 1000
                result.floor = await queue_floor(amqp_url, pause, args.runs)
                result.write = await asyncio.to_thread(write_floor, written, pause, args.runs)
                result.http = [
                    (last - sent) * 1000 for sent, _, last in await _run_client(port, HTTP_FLOOR, args.runs, pause)
                ]
                results.append(result)
            return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="timed requests per path (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests first (default 5)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--breakdown", action="store_true", help="time each step of the requests too")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        port, path, count, pause = args.client.split(":")
        client(int(port), path, int(count), float(pause))
        return
    args.paths = [path.strip() for path in args.paths.split(",") if path.strip()]
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown path(s) {', '.join(sorted(unknown))}; use {', '.join(PATHS)}")
    share_cpu_politely()  # as the server's entry points do, before torch loads
    report(asyncio.run(run(args)), args)


if __name__ == "__main__":
    main()
