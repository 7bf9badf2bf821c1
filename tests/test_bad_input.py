"""Bad input gets a clear 4xx JSON error and nothing is written (embedded store, R2 disabled)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import pytest

from api.errors import RETRY_AFTER_SECONDS, ApiError
from api.jobs import raise_for_failure
from contract.messages import NON_BLANK
from infra.storage import InvalidKeyError
from tests.support.bombs import png_bomb, truncated_jpeg
from tests.support.images import encoded
from tests.support.server import running_server

MAX_BYTES = 256 * 1024


@pytest.fixture(scope="module")
async def server(make_settings):
    settings = make_settings(IMAGE_SEARCH_MAX_BYTES=str(MAX_BYTES), IMAGE_ENABLED="1")
    async with running_server(settings) as running:
        good = await running.client.post("/v1/images", files={"file": ("ok.png", encoded(1), "image/png")})
        assert good.status_code == 201
        running.good_id = good.json()["id"]
        yield running


def stored_files(server) -> list[str]:
    root = server.services.settings.local_storage_dir / "objects"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
async def nothing_written(server):
    before_files = stored_files(server)
    before_count = await server.services.index.count()
    yield
    assert stored_files(server) == before_files
    assert await server.services.index.count() == before_count
    assert list((server.services.settings.local_storage_dir / "tmp").iterdir()) == []


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == status
    assert body["message"]
    if code is not None:
        assert body["code"] == code, body
    return body


@pytest.mark.parametrize(
    ("name", "data", "content_type", "code"),
    [
        ("empty.png", b"", "image/png", "empty_file"),
        ("fake.png", b"this is plain text, not a picture" * 10, "image/png", "not_an_image"),
        ("cut.jpg", truncated_jpeg(), "image/jpeg", "corrupt_image"),
        ("bomb.png", png_bomb(), "image/png", "too_many_pixels"),
    ],
)
async def test_bad_images_are_rejected(server, nothing_written, name, data, content_type, code):
    response = await server.client.post("/v1/images", files={"file": (name, data, content_type)})
    assert_error(response, 422, code)


async def test_bad_image_is_rejected_by_search_by_image_too(server):
    response = await server.client.post(
        "/v1/images/search/by-image", files={"file": ("x.png", b"not an image at all", "image/png")}
    )
    assert_error(response, 422, "not_an_image")


async def test_missing_file_field(server, nothing_written):
    response = await server.client.post("/v1/images", files={"picture": ("a.png", encoded(2), "image/png")})
    assert_error(response, 400)


async def test_not_multipart(server, nothing_written):
    response = await server.client.post("/v1/images", json={"file": "abc"})
    assert_error(response, 400)


async def test_upload_just_over_the_limit_is_413(server, nothing_written):
    data = b"\x89PNG" + b"\x00" * MAX_BYTES
    response = await server.client.post("/v1/images", files={"file": ("big.png", data, "image/png")})
    body = assert_error(response, 413, "payload_too_large")
    assert str(MAX_BYTES) in body["message"]


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)


def _address(server) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


async def test_oversize_upload_is_refused_before_the_body_is_sent(server, nothing_written):
    """A declared Content-Length over the limit is refused without reading the body."""
    host, port = _address(server)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        (
            f"POST /v1/images HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
            f"Content-Length: {100 * 1024 * 1024}\r\n\r\n--xyz\r\n"
        ).encode()
    )
    await writer.drain()
    head = await _read_head(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413")


async def test_oversize_streamed_upload_is_refused_while_streaming(server, nothing_written):
    """Without a Content-Length, the server refuses soon after the limit, not after the whole body."""
    host, port = _address(server)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        (
            f"POST /v1/images HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
    )
    preamble = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
    writer.write(b"%x\r\n%s\r\n" % (len(preamble), preamble))
    response = asyncio.create_task(_read_head(reader))
    chunk = b"\x00" * 65536
    sent = 0
    # a 100 MB body; the answer must come long before its end (loopback socket buffers alone take a few MB, more
    # when the machine is busy and the server's turn comes late)
    while not response.done() and sent < 400 * MAX_BYTES:
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sent += len(chunk)
        try:
            await asyncio.wait_for(writer.drain(), 1)
        except (ConnectionError, TimeoutError):
            break
        await asyncio.sleep(0)
    head = await response
    writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert sent < 40 * MAX_BYTES


@pytest.mark.parametrize(
    "body",
    [
        {"query": "", "limit": 5},
        {"query": "   ", "limit": 5},
        {"query": "\x1d\x85\ufeff", "limit": 5},
        {"query": "cat", "limit": 0},
        {"query": "cat", "limit": 1000},
        {"query": "cat", "limit": "five"},
        {"query": 5, "limit": 5},
        {"limit": 5},
        {"query": "cat", "limit": 5, "unexpected": True},
        ["cat"],
    ],
)
async def test_bad_search_requests(server, body):
    response = await server.client.post("/v1/images/search", json=body)
    assert_error(response, 400)


async def test_malformed_json(server):
    response = await server.client.post(
        "/v1/images/search", content=b'{"query": "cat", "limit": ', headers={"content-type": "application/json"}
    )
    body = assert_error(response, 400)
    assert "json" in body["message"].lower()


@pytest.mark.parametrize("method", ["get", "delete"])
@pytest.mark.parametrize("image_id", ["be603883-de1d-4082-b102-76013b3a677a", "not-a-uuid"])
async def test_unknown_image_ids(server, method, image_id):
    response = await getattr(server.client, method)(f"/v1/images/{image_id}")
    assert_error(response, 404, "image_not_found")
    response = await server.client.get(f"/v1/images/{image_id}/file")
    assert_error(response, 404, "image_not_found")


TIED_ID = uuid.UUID("6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9")
TIED_CURSOR = f"1700000000000000.{TIED_ID.hex}"


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!",
        "",
        "-1",
        "1700000000000000.",
        TIED_CURSOR[:-1],
        TIED_CURSOR.upper(),
        f"1700000000000000.{TIED_ID}",
        TIED_CURSOR + ".1",
        TIED_CURSOR + "\n",
        "1" * 19,
    ],
)
async def test_bad_cursor(server, cursor):
    response = await server.client.get("/v1/images", params={"cursor": cursor})
    assert_error(response, 400, "invalid_cursor")


@pytest.mark.parametrize("cursor", [TIED_CURSOR, "1700000000000000"])
async def test_a_cursor_of_either_form_is_taken_and_the_documents_pattern_says_so(server, cursor):
    """The cursor a page gives (a time and an id) and the earlier form (a time alone), which clients may hold."""
    response = await server.client.get("/v1/images", params={"cursor": cursor})
    assert response.status_code == 200, response.text
    document = (await server.client.get("/schema/openapi.json")).json()
    parameters = {p["name"]: p["schema"] for p in document["paths"]["/v1/images"]["get"]["parameters"]}
    pattern = parameters["cursor"]["pattern"]
    assert re.search(pattern, cursor) and not re.search(pattern, cursor + "\n")


@pytest.mark.parametrize(
    ("path", "params", "body", "code"),
    [
        ("/v1/images", {"cursor": "1700000000000000\n"}, None, "invalid_cursor"),
        ("/v1/images", {"source": "upload\n"}, None, "invalid_request"),
        ("/v1/images", {"content_type": "image/png\n"}, None, "invalid_request"),
        ("/v1/images/search", None, {"query": "cat", "filter": {"source": "upload\n"}}, "invalid_request"),
        ("/v1/images/search", None, {"query": "cat", "filter": {"content_type": ["image/png\n"]}}, "invalid_request"),
    ],
)
async def test_a_value_with_a_trailing_newline_is_a_400(server, path, params, body, code):
    """Python's `$` also matches before a final newline: a cursor or filter value followed by "\\n" is refused as
    a malformed one is, and the document's pattern for it refuses it too."""
    if body is None:
        response = await server.client.get(path, params=params)
    else:
        response = await server.client.post(path, json=body)
    assert_error(response, 400, code)
    document = (await server.client.get("/schema/openapi.json")).json()
    source = document["components"]["schemas"]["SearchFilter"]["properties"]["source"]["pattern"]
    assert re.search(source, "upload") and not re.search(source, "upload\n")


async def test_bad_limit_on_listing(server):
    assert_error(await server.client.get("/v1/images", params={"limit": 0}), 400)
    assert_error(await server.client.get("/v1/images", params={"limit": "ten"}), 400)


async def test_unknown_route_is_json_404(server):
    assert_error(await server.client.get("/v1/nothing-here"), 404)


async def test_signed_file_urls_of_the_embedded_store(server):
    redirect = await server.client.get(f"/v1/images/{server.good_id}/file")
    assert redirect.status_code == 307
    location = redirect.headers["location"]
    ok = await server.client.get(location)
    assert ok.status_code == 200
    assert ok.content == encoded(1)
    assert ok.headers["content-type"] == "image/png"

    tampered = location.replace("signature=", "signature=x")
    assert_error(await server.client.get(tampered), 403, "invalid_signature")
    expired = location.split("?")[0] + "?expires=1&signature=" + location.split("signature=")[1]
    assert_error(await server.client.get(expired), 403, "invalid_signature")
    other_key = location.replace(server.good_id, str(uuid.uuid4()))
    assert_error(await server.client.get(other_key), 403, "invalid_signature")
    # found by schemathesis against the one-process server: a non-ASCII signature was a 500 (hmac compares ASCII
    # text only), and an expiry past any 64-bit time must not overflow anything
    far = location.split("?")[0] + "?expires=" + "9" * 30 + "&signature=%C2%A4%C2%87"
    assert_error(await server.client.get(far), 403, "invalid_signature")


async def test_error_bodies_are_json_objects(server):
    response = await server.client.post("/v1/images/search", content=b"nope", headers={"content-type": "text/plain"})
    assert response.status_code in (400, 415)
    assert isinstance(json.loads(response.content), dict)


DEEP = b'{"query": ' + b"[" * 5000 + b"]" * 5000 + b"}"
DEEP_PARAMS = b'{"type": "image.generate", "params": {"prompt": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
BAD_UTF8 = b'{"query": "caf\xc3\x28 \xff"}'


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/images/search", DEEP),
        ("/v1/jobs", DEEP_PARAMS),
        ("/v1/images/generate", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("/v1/images/search", BAD_UTF8),
        ("/v1/jobs", b'{"type": "image.generate", "params": {"prompt": "\xed\xa0\x80"}}'),
        ("/v1/images/generate", b'{"prompt": "\xff\xfe"}'),
    ],
    ids=["deep-search", "deep-jobs", "deep-generate", "utf8-search", "utf8-jobs", "utf8-generate"],
)
@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
async def test_deeply_nested_or_invalid_utf8_json_is_a_400(server, nothing_written, path, body, content_type):
    """Whatever the Content-Type says: a JSON route decodes its body as JSON either way."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = await server.client.post(path, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "malformed_json"


async def test_a_multipart_route_does_not_check_its_body_as_json(server, nothing_written):
    response = await server.client.post("/v1/images", content=DEEP, headers={"Content-Type": "text/plain"})
    assert response.status_code == 400, response.text
    assert response.json()["code"] != "malformed_json"


async def test_too_many_multipart_parts_is_a_413_that_says_so(server, nothing_written):
    files = [("file", ("a.png", encoded(1), "image/png"))] + [(f"field{n}", (None, "x")) for n in range(40)]
    response = await server.client.post("/v1/images", files=files)
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "too_many_parts"
    assert "32" in response.json()["message"]


async def test_two_file_fields_is_a_400_that_says_so(server, nothing_written):
    files = [("file", ("a.png", encoded(1), "image/png")), ("file", ("b.png", encoded(2), "image/png"))]
    for path in ("/v1/images", "/v1/images/search/by-image"):
        response = await server.client.post(path, files=files)
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_request"
        assert "one `file`" in response.json()["message"]


async def test_options_and_405_name_every_method_of_the_path(server):
    image_path = "/v1/images/00000000-0000-0000-0000-000000000000"
    for path, methods in (("/v1/images", "GET, OPTIONS, POST"), (image_path, "DELETE, GET, OPTIONS")):
        options = await server.client.options(path)
        assert options.status_code == 204 and options.headers["allow"] == methods
        refused = await server.client.patch(path)
        assert_error(refused, 405)
        assert set(refused.headers["allow"].replace(" ", "").split(",")) == set(methods.replace(" ", "").split(","))


async def test_the_document_describes_the_errors_and_media_types_the_server_sends(server):
    document = (await server.client.get("/schema/openapi.json")).json()
    assert set(document["components"]["schemas"]["ErrorBody"]["required"]) == {"status", "code", "message"}
    generate = document["paths"]["/v1/images/generate"]["post"]["responses"]
    assert "image/png" in generate["200"]["content"] and "202" in generate
    for status in ("400", "413", "422", "503"):
        assert generate[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "404" in document["paths"]["/v1/images/{image_id}"]["delete"]["responses"]
    assert "text/plain" in next(iter(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]))
    metrics = await server.client.get("/metrics")
    assert metrics.headers["content-type"].count("charset") == 1


async def test_the_document_states_the_servers_own_idea_of_blank_text(server):
    """Text that must not be blank (a prompt, a search query, an Idempotency-Key) carries the pattern the server
    checks it with, so a client validating against the document refuses what the server refuses (schemathesis's
    long run found "\\x1f" valid by `\\S` and refused by the server)."""
    document = (await server.client.get("/schema/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert schemas["GenerateImageRequest"]["properties"]["prompt"]["pattern"] == NON_BLANK
    assert schemas["SearchRequest"]["properties"]["query"]["pattern"] == NON_BLANK
    headers = document["paths"]["/v1/images/generate"]["post"]["parameters"]
    assert next(p for p in headers if p["name"] == "Idempotency-Key")["schema"]["pattern"] == NON_BLANK
    for blank in ("\x1f", "\x85", "\ufeff", "\u3000"):
        assert re.search(NON_BLANK, blank) is None


async def test_the_document_limits_key_segments_as_the_embedded_store_does(server):
    """The embedded store keeps each key segment as a file name (at most 250 bytes): its server's document says
    so in the pattern of ref_audio_key, and the store refuses a longer one as the document does."""
    document = (await server.client.get("/schema/openapi.json")).json()
    pattern = document["components"]["schemas"]["VoiceFromKeyRequest"]["properties"]["ref_audio_key"]["pattern"]
    assert re.search(pattern, "voice/refs/" + "a" * 250)
    assert not re.search(pattern, "voice/refs/" + "a" * 251)
    with pytest.raises(InvalidKeyError, match="longer than 250 bytes"):
        await server.services.store.exists("voice/refs/" + "a" * 251)


async def test_a_long_part_header_is_a_400_that_says_so(server, nothing_written):
    """The multipart parser's limit on one header line is not a part count: it is named as what it is."""
    response = await server.client.post("/v1/images", files={"file": ("a" * 4300 + ".png", encoded(1), "image/png")})
    body = assert_error(response, 400, "invalid_request")
    assert "header line" in body["message"]


async def test_a_file_name_over_255_characters_is_refused_before_anything_is_written(server, nothing_written):
    response = await server.client.post("/v1/images", files={"file": ("a" * 300 + ".png", encoded(1), "image/png")})
    body = assert_error(response, 400, "invalid_request")
    assert "304 characters" in body["message"]


@pytest.mark.parametrize(
    ("field", "expected"),
    [((None, b"\xff\xfe", None), "not valid utf-8"), ((None, b"abc", "text/plain; charset=bogus"), "charset")],
    ids=["not-utf8", "unknown-charset"],
)
@pytest.mark.parametrize("path", ["/v1/images", "/v1/images/search/by-image"])
async def test_a_form_field_that_is_not_text_in_its_charset_is_a_400(server, nothing_written, path, field, expected):
    files = [("file", ("a.png", encoded(1), "image/png")), ("note", field)]
    body = assert_error(await server.client.post(path, files=files), 400, "invalid_request")
    assert expected in body["message"].lower()


def test_a_job_that_failed_on_an_unavailable_dependency_answers_503_with_retry_after():
    with pytest.raises(ApiError) as raised:
        raise_for_failure("storage_unavailable", "the object store is unavailable")
    assert (raised.value.status, raised.value.headers["Retry-After"]) == (503, str(RETRY_AFTER_SECONDS))
