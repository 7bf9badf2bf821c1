"""The S3 API over real HTTP: moto's server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlparse

import boto3
from moto.server import ThreadedMotoServer

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"


class S3Server:
    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request would bury test failures
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    def start(self) -> None:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def new_bucket(self) -> str:
        name = f"bucket-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        self._server.stop()


class S3Process:
    """moto's server in its own process, so a test can freeze (SIGSTOP) and thaw it to simulate an outage."""

    def __init__(self, port: int) -> None:
        self.endpoint = f"http://127.0.0.1:{port}"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def create_bucket(self, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.create_bucket(Bucket=name)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def keys(self, bucket: str) -> list[str]:
        return [item["Key"] for item in self.client.list_objects_v2(Bucket=bucket).get("Contents", [])]

    def freeze(self) -> None:
        os.kill(self._process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self._process.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Frozen for the block: the kernel still accepts connections and takes what is sent, but nothing answers,
        as from a hung server or a network that black-holes the replies; thawed again whatever the block does."""
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def stop(self) -> None:
        if self._process.poll() is not None:
            return
        self.thaw()
        self._process.terminate()
        self._process.wait()


@contextlib.asynccontextmanager
async def trickling(endpoint: str, chunk_bytes: int, pause_seconds: float) -> AsyncIterator[str]:
    """A proxy in front of an S3 server that passes its answers on at most `chunk_bytes` every `pause_seconds` (the
    requests at once): a slow link, on which a download takes long while bytes keep coming. Yields its endpoint."""
    upstream = urlparse(endpoint)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pause: float) -> None:
        try:
            while data := await reader.read(chunk_bytes):
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(pause)
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(upstream.hostname, upstream.port)
        await asyncio.gather(
            pipe(reader, upstream_writer, 0), pipe(upstream_reader, writer, pause_seconds), return_exceptions=True
        )

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@dataclasses.dataclass
class Link:
    endpoint: str = ""
    cut: bool = False  # while set, nothing passes either way


@contextlib.asynccontextmanager
async def cuttable(endpoint: str) -> AsyncIterator[Link]:
    """A proxy in front of an S3 server whose link can be cut: a network that drops every packet, so that a request
    sent meanwhile never reaches the server (a frozen server still answers it once thawed). Yields the link."""
    upstream = urlparse(endpoint)
    link = Link()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                if not link.cut:
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(upstream.hostname, upstream.port)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    link.endpoint = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield link
    finally:
        server.close()
        await server.wait_closed()
