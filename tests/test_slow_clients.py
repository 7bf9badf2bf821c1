"""Slow clients: a request head must arrive whole within HTTP_READ_TIMEOUT_SECONDS of its first byte (else 408 and
the connection closes), and a connection that sends nothing is closed after HTTP_KEEPALIVE_SECONDS, so sockets
that never finish a request cannot pile up (through the real uvicorn server)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.support.server import running_server


@pytest.fixture(scope="module")
async def server(make_settings):
    settings = make_settings(HTTP_READ_TIMEOUT_SECONDS="2", HTTP_KEEPALIVE_SECONDS="1", IMAGE_SEARCH_ENABLED="0")
    async with running_server(settings) as running:
        yield running


async def _connect(server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def test_a_connection_that_sends_nothing_is_closed(server):
    reader, writer = await _connect(server)
    try:
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed, with no answer
        assert 0.8 < time.monotonic() - started < 5
    finally:
        writer.close()


async def test_a_head_trickled_a_byte_at_a_time_is_408(server):
    reader, writer = await _connect(server)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()

        async def trickle() -> None:
            while True:
                await asyncio.sleep(0.3)
                writer.write(b"X")
                await writer.drain()

        trickling = asyncio.create_task(trickle())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        finally:
            trickling.cancel()
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"connection: close" in head.lower()
        assert 1.5 < time.monotonic() - started < 6
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))[15:])
        body = json.loads(await reader.readexactly(length))
        assert body["code"] == "request_timeout" and "HTTP_READ_TIMEOUT_SECONDS" in body["message"]
    finally:
        writer.close()


async def test_a_keep_alive_connection_serves_requests_whose_heads_arrive_in_time(server):
    reader, writer = await _connect(server)
    try:
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            await asyncio.sleep(0.5)  # a head in two parts, well within the timeout
            writer.write(b"\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))[15:])
            await reader.readexactly(length)
    finally:
        writer.close()
