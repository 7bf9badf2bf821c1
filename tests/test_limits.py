"""Request limits: a long request target gets 414, too many or too large headers 431 (refused while the head is
read, before it is buffered whole), what is not HTTP a JSON 400, a body that stops arriving 408; none is a 500
(the server's own process settings, through the real uvicorn server)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import structlog
from litestar.middleware import rate_limit

import api.app
from api.app import create_app
from tests.support.images import encoded
from tests.support.server import running_server


@pytest.fixture(scope="module")
async def server(make_settings):
    settings = make_settings(
        HTTP_MAX_HEADERS="30",
        HTTP_MAX_HEADER_BYTES="4096",
        HTTP_MAX_REQUEST_LINE_BYTES="2048",
        HTTP_READ_TIMEOUT_SECONDS="1",
    )
    async with running_server(settings) as running:
        yield running


async def test_too_many_headers_is_431(server):
    headers = {f"x-extra-{n}": "1" for n in range(40)}
    response = await server.client.get("/v1/images", headers=headers)
    assert response.status_code == 431
    assert response.json()["code"] == "headers_too_large"
    assert "HTTP_MAX_HEADERS" in response.json()["message"]


async def test_too_many_header_bytes_is_431(server):
    response = await server.client.get("/v1/images", headers={"x-big": "a" * 8000})
    assert response.status_code == 431
    assert response.json()["code"] == "headers_too_large"


async def raw_exchange(server, chunks, timeout: float = 10) -> tuple[bytes, dict]:
    """Send `chunks` on a fresh connection (stopping early if the server closes it); the status line and JSON body
    of the answer."""
    host, port = server.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for chunk in chunks:
            if reader.at_eof():
                break
            writer.write(chunk)
            try:
                await writer.drain()
            except ConnectionError:
                break
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=timeout)
        lines = head.split(b"\r\n")
        length = int(next(line for line in lines if line.lower().startswith(b"content-length")).split(b":")[1])
        assert b"connection: close" in head.lower()
        return lines[0], json.loads(await reader.readexactly(length))
    finally:
        writer.close()


def huge_header():
    yield b"GET /v1/images HTTP/1.1\r\nHost: x\r\nX-Huge: "
    for _ in range(256):  # 16 MB, never finished
        yield b"a" * 65536


def many_headers():
    yield b"GET /v1/images HTTP/1.1\r\nHost: x\r\n"
    for block in range(100):
        yield b"".join(b"X-%d-%d: 1\r\n" % (block, n) for n in range(1000))


@pytest.mark.parametrize("chunks", [huge_header, many_headers], ids=["16MB-header", "100k-headers"])
async def test_an_endless_head_is_refused_while_it_arrives(server, chunks):
    status, body = await raw_exchange(server, chunks())
    assert status.startswith(b"HTTP/1.1 431"), status
    assert body["code"] == "headers_too_large"


async def test_a_long_request_target_is_414(server):
    status, body = await raw_exchange(server, [b"GET /v1/images?q=" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"])
    assert status.startswith(b"HTTP/1.1 414"), status
    assert body["code"] == "uri_too_long" and "HTTP_MAX_REQUEST_LINE_BYTES" in body["message"]


async def test_what_is_not_http_gets_a_json_400(server):
    status, body = await raw_exchange(server, [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n"])
    assert status.startswith(b"HTTP/1.1 400"), status
    assert body["code"] == "bad_request"


async def test_a_stalled_body_is_408_not_a_hung_connection(server):
    host, port = server.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v1/images/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"query": "'
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert head.startswith(b"HTTP/1.1 408"), head
        length = int(
            next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1]
        )
        body = json.loads(await reader.readexactly(length))
        assert body["code"] == "request_timeout"
        assert "HTTP_READ_TIMEOUT_SECONDS" in body["message"]
    finally:
        writer.close()


async def test_a_client_that_leaves_mid_upload_is_logged_as_gone_not_as_a_server_error(server):
    host, port = server.base_url.removeprefix("http://").split(":")
    boundary = b"b0undary"
    head = (
        b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
        b"Content-Length: 1000000\r\n\r\n--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    )
    with structlog.testing.capture_logs() as logs:
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + b"\0" * 100_000)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()
        for _ in range(50):
            if any(entry["event"] == "client_disconnected" for entry in logs):
                break
            await asyncio.sleep(0.05)
    gone = [entry for entry in logs if entry["event"] == "client_disconnected"]
    assert [(entry["log_level"], entry["path"]) for entry in gone] == [("info", "/v1/images")], logs
    assert not [entry for entry in logs if entry["log_level"] in ("error", "critical")], logs


async def test_rate_limit_per_key_and_per_address_answers_429_with_retry_after(make_settings):
    first, second = "read:" + "1" * 20, "read:" + "2" * 20
    settings = make_settings(RATE_LIMIT_PER_MINUTE="3", API_KEYS=f"{first},{second}")
    async with running_server(settings) as running:
        client = running.client
        one = {"Authorization": "Bearer " + "1" * 20}
        two = {"Authorization": "Bearer " + "2" * 20}
        assert [(await client.get("/v1/images", headers=one)).status_code for _ in range(3)] == [200] * 3
        limited = await client.get("/v1/images", headers=one)
        assert limited.status_code == 429
        assert limited.json()["code"] == "too_many_requests"
        assert int(limited.headers["Retry-After"]) > 0
        assert (await client.get("/v1/images", headers=two)).status_code == 200, "each key has its own allowance"
        assert (await client.get("/healthz")).status_code == 200, "health checks are not counted"
        bogus = [
            (await client.get("/v1/images", headers={"Authorization": f"Bearer x{n:020d}"})).status_code
            for n in range(4)
        ]
        assert bogus == [401, 401, 401, 429], "invalid keys share their address's allowance"


async def _status_from(app, address: str) -> int:
    """GET /v1/images as a client at `address`, through the app itself (ASGI)."""
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return (await client.get("/v1/images")).status_code


async def test_rate_limit_buckets_of_clients_gone_quiet_are_deleted(make_settings, monkeypatch):
    """A client seen once has its bucket deleted by the sweep after its window, though it never comes back (the
    window and RATE_LIMIT_SWEEP_SECONDS are a minute; two seconds here)."""
    monkeypatch.setitem(rate_limit.DURATION_VALUES, "minute", 2)
    monkeypatch.setattr(api.app, "RATE_LIMIT_SWEEP_SECONDS", 2.0)
    async with running_server(make_settings(RATE_LIMIT_PER_MINUTE="5")) as running:
        app = create_app(running.services)
        buckets = app.stores.get("rate_limit")
        assert [await _status_from(app, f"10.0.{n // 256}.{n % 256}") for n in range(100)] == [200] * 100
        assert len(buckets._store) == 100
        await asyncio.sleep(2.2)
        assert await _status_from(app, "10.1.0.1") == 200
        assert len(buckets._store) == 1, "the buckets of clients whose window has passed are still there"


async def test_an_ipv6_client_is_rate_limited_by_its_64(make_settings):
    """A host holds a whole /64 and may take any address in it: its addresses share one allowance."""
    async with running_server(make_settings(RATE_LIMIT_PER_MINUTE="3")) as running:
        app = create_app(running.services)
        same = ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::3"]
        assert [await _status_from(app, address) for address in same] == [200, 200, 200, 429]
        assert await _status_from(app, "2001:db8:1:3::1") == 200, "another /64 has its own allowance"
        mapped = ["::ffff:10.0.0.1", "::ffff:10.0.0.2", "::ffff:10.0.0.3", "::ffff:10.0.0.4"]
        assert [await _status_from(app, address) for address in mapped] == [200] * 4, "IPv4 clients, each its own"


async def test_the_page_and_signed_links_are_not_counted_by_the_rate_limit(make_settings):
    """A gallery's thumbnails cost their redirects only: the signed download each leads to is not counted."""
    async with running_server(make_settings(RATE_LIMIT_PER_MINUTE="3")) as running:
        client = running.client
        uploaded = await client.post("/v1/images", files={"file": ("a.png", encoded(1), "image/png")})
        assert uploaded.status_code == 201, uploaded.text
        redirect = await client.get(uploaded.json()["thumbnail_url"])
        assert redirect.status_code == 307
        assert [(await client.get(redirect.headers["location"])).status_code for _ in range(5)] == [200] * 5
        assert [(await client.get("/")).status_code for _ in range(3)] == [200] * 3
        assert (await client.get("/v1/images")).status_code == 200, "the third counted request"
        assert (await client.get("/v1/images")).status_code == 429


async def test_cors_and_allowed_hosts(make_settings):
    settings = make_settings(CORS_ORIGINS="https://app.example", ALLOWED_HOSTS="127.0.0.1,api.example")
    async with running_server(settings) as running:
        client = running.client
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        allowed = await client.options("/v1/images/search", headers=preflight)
        assert allowed.status_code in (200, 204)
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        listed = await client.get("/v1/images", headers={"Origin": "https://app.example"})
        assert listed.headers["access-control-allow-origin"] == "https://app.example"
        exposed = {name.strip().lower() for name in listed.headers["access-control-expose-headers"].split(",")}
        documented = {"retry-after", "x-seed", "x-job-id", "x-next-cursor", "x-audio-duration", "x-thumbnail"}
        assert documented <= exposed, documented - exposed  # a page on another origin reads what the README names
        other = await client.get("/v1/images", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert (await client.get("/v1/images", headers={"Host": "api.example"})).status_code == 200
        refused = await client.get("/v1/images", headers={"Host": "evil.example"})
        assert refused.status_code == 400
        assert refused.json()["code"] == "invalid_host", refused.text
