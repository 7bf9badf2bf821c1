"""Image search end to end: real RabbitMQ, the S3 API over HTTP (moto), embedded Qdrant, tiny CLIP."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import uuid
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlparse

import httpx
import msgspec
import pytest
from PIL import Image

from api.urls import redirect_target
from contract.clock import iso_from_us
from contract.image_ids import thumbnail_key
from infra.vectors import ImageRecord
from tests.support.images import encoded, oriented_jpeg
from tests.support.server import running_server


@pytest.fixture(scope="module")
async def server(make_settings, s3):
    bucket = s3.new_bucket()
    async with running_server(make_settings(r2_bucket=bucket, endpoint=s3.endpoint)) as running:
        running.bucket = bucket
        yield running


async def upload(client: httpx.AsyncClient, data: bytes, name: str, content_type: str = "image/png", **params):
    return await client.post("/v1/images", files={"file": (name, data, content_type)}, params=params)


@pytest.fixture(scope="module")
async def uploaded(server):
    images = {}
    for seed in range(6):
        fmt, mime = ("PNG", "image/png") if seed % 2 else ("JPEG", "image/jpeg")
        data = encoded(1000 + seed, fmt)
        response = await upload(server.client, data, f"pic-{seed}.{fmt.lower()}", mime)
        assert response.status_code == 201, response.text
        images[response.json()["id"]] = (data, response.json())
    return images


async def test_upload_returns_the_record_and_stores_the_original(server, s3, uploaded):
    for image_id, (data, record) in uploaded.items():
        ext = "png" if record["content_type"] == "image/png" else "jpg"
        assert record["r2_key"] == f"images/originals/{image_id}.{ext}"
        assert record["size"] == len(data)
        assert (record["width"], record["height"]) == (96, 72)
        assert record["source"] == "upload"
        assert record["file_url"].endswith(f"/v1/images/{image_id}/file")
        assert record["filename"].startswith("pic-")
    assert set(s3.keys(server.bucket, "images/originals/")) >= {r["r2_key"] for _, r in uploaded.values()}


def stored_thumbnail(s3, bucket: str, image_id: str) -> Image.Image:
    data = s3.client.get_object(Bucket=bucket, Key=thumbnail_key(image_id))["Body"].read()
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (encoded(31, "JPEG", (1024, 768)), (384, 288)),
        (oriented_jpeg(32, (1024, 768), orientation=6), (288, 384)),  # stored landscape, shown portrait
        (encoded(33, "PNG", (200, 150)), (200, 150)),  # smaller than THUMBNAIL_MAX_SIDE: never upscaled
    ],
    ids=["large", "exif-rotated", "small"],
)
async def test_indexing_stores_a_webp_thumbnail_before_the_point(server, s3, data, size):
    created = (await upload(server.client, data, "thumb-me.jpg", "image/jpeg")).json()
    thumbnail = stored_thumbnail(s3, server.bucket, created["id"])
    assert (thumbnail.format, thumbnail.size) == ("WEBP", size)
    assert (await server.services.index.get(created["id"])).thumbnail is True


async def test_listing_is_newest_first_and_pages_with_a_cursor(server, uploaded):
    seen: list[str] = []
    params: dict[str, object] = {"limit": 4}
    while True:
        response = await server.client.get("/v1/images", params=params)
        assert response.status_code == 200
        seen += [item["id"] for item in response.json()]
        cursor = response.headers.get("X-Next-Cursor")
        if not cursor:
            break
        assert 'rel="next"' in response.headers["Link"]
        params = {"limit": 4, "cursor": cursor}
    assert len(seen) == len(set(seen))
    upload_order = list(uploaded)
    listed = [image_id for image_id in seen if image_id in uploaded]
    assert listed == list(reversed(upload_order))


TIED_US = 1_900_000_000_000_000  # after every upload of this module: these records list first


@pytest.fixture
async def tied(server) -> AsyncIterator[list[str]]:
    """Seven records of their own source written straight into the index, five of them created in the same
    microsecond (as by processors with their own clocks on one Qdrant server), one before and one after them; the
    ids in listing order: newest first, the same microsecond by id."""
    index = server.services.index
    dim = (await index.stats()).dim
    times = [TIED_US + 1, *[TIED_US] * 5, TIED_US - 1]
    records = [
        ImageRecord(
            id=str(uuid.uuid4()),
            r2_key="images/originals/tied.png",
            content_type="image/png",
            size=1,
            width=1,
            height=1,
            created_at=iso_from_us(created_us),
            created_us=created_us,
            source="tied-clocks",
        )
        for created_us in times
    ]
    await index.upsert([(record, [1.0] * dim) for record in records])
    try:
        yield [r.id for r in sorted(records, key=lambda r: (-r.created_us, uuid.UUID(r.id)))]
    finally:
        for record in records:
            await index.delete(record.id)


async def follow_links(client: httpx.AsyncClient, params: dict[str, str]) -> tuple[list[str], int]:
    """Every id the listing gives, following its Link header page by page; and the number of pages."""
    seen: list[str] = []
    pages = 0
    while True:
        response = await client.get("/v1/images", params=params)
        assert response.status_code == 200, response.text
        seen += [item["id"] for item in response.json()]
        pages += 1
        if "Link" not in response.headers:
            return seen, pages
        params = dict(parse_qsl(urlparse(response.headers["Link"].split(">")[0].lstrip("<")).query))
        assert params["cursor"] == response.headers["X-Next-Cursor"]


@pytest.mark.parametrize("limit", [1, 2, 3, 4])
async def test_images_created_in_the_same_microsecond_are_each_listed_once(server, tied, limit):
    seen, pages = await follow_links(server.client, {"limit": str(limit), "source": "tied-clocks"})
    assert seen == tied
    assert pages == -(-len(tied) // limit)


async def test_a_cursor_of_the_earlier_form_still_pages_before_its_time(server, tied):
    """Cursors handed out before the listing's order broke ties (a creation time alone) still work, as they did:
    the next page starts before that microsecond."""
    response = await server.client.get("/v1/images", params={"source": "tied-clocks", "cursor": str(TIED_US)})
    assert response.status_code == 200, response.text
    assert [item["id"] for item in response.json()] == tied[-1:]
    response = await server.client.get("/v1/images", params={"source": "tied-clocks", "cursor": str(TIED_US + 1)})
    assert [item["id"] for item in response.json()] == tied[1:]


async def test_search_by_each_image_returns_itself_first(server, uploaded):
    for image_id, (data, _) in uploaded.items():
        response = await server.client.post(
            "/v1/images/search/by-image",
            files={"file": ("q.bin", data, "application/octet-stream")},
            params={"limit": 3},
        )
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert results[0]["id"] == image_id
        assert results[0]["score"] > 0.99


@pytest.mark.parametrize("query", ["a red circle on a blue background", "고양이"])
async def test_text_search_ranks_limit_results(server, uploaded, query):
    response = await server.client.post("/v1/images/search", json={"query": query, "limit": 4})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 4
    scores = [hit["score"] for hit in results]
    assert scores == sorted(scores, reverse=True)
    for hit in results:
        assert set(hit) >= {"id", "score", "r2_key", "file_url"}


async def test_file_redirect_downloads_the_original(server, uploaded):
    image_id, (data, _) = next(iter(uploaded.items()))
    response = await server.client.get(f"/v1/images/{image_id}/file")
    assert response.status_code == 307
    location = response.headers["location"]
    assert "Signature" in location or "X-Amz-Signature" in location
    async with httpx.AsyncClient() as plain:
        download = await plain.get(location)
    assert download.status_code == 200
    assert download.content == data


async def test_the_embedded_stores_signed_links_are_followed_on_the_address_called(make_settings):
    """Links name PUBLIC_BASE_URL; a redirect to the embedded store's signed link (a route of this server) is a path,
    so a client that called another address (this server's page opened there) is not sent away from it."""
    async with running_server(make_settings(PUBLIC_BASE_URL="http://ams.invalid:8000")) as running:
        created = (await upload(running.client, encoded(36, "PNG"), "here.png")).json()
        assert created["file_url"] == f"http://ams.invalid:8000/v1/images/{created['id']}/file"
        for route, key in (("file", created["r2_key"]), ("thumbnail", thumbnail_key(created["id"]))):
            redirect = await running.client.get(f"/v1/images/{created['id']}/{route}")
            assert redirect.status_code == 307
            assert redirect.headers["location"].startswith(f"/v1/files/{key}?expires=")
            served = await running.client.get(redirect.headers["location"])
            assert served.status_code == 200
            assert served.headers["x-content-type-options"] == "nosniff"
    behind_a_prefix = make_settings(PUBLIC_BASE_URL="https://ams.example/api")
    signed = "https://ams.example/api/v1/files/images/originals/x.png?expires=1&signature=s"
    assert redirect_target(behind_a_prefix, signed) == "/api/v1/files/images/originals/x.png?expires=1&signature=s"
    presigned = "https://bucket.r2.example/v1/files/x.png?X-Amz-Signature=s"
    assert redirect_target(behind_a_prefix, presigned) == presigned


async def test_thumbnail_redirect_downloads_the_stored_thumbnail(server, s3, uploaded):
    image_id, (_, record) = next(iter(uploaded.items()))
    assert record["thumbnail_url"].endswith(f"/v1/images/{image_id}/thumbnail")
    response = await server.client.get(record["thumbnail_url"])
    assert response.status_code == 307
    assert response.headers["x-thumbnail"] == "stored"
    async with httpx.AsyncClient() as plain:
        download = await plain.get(response.headers["location"])
    assert download.status_code == 200
    assert download.content == s3.client.get_object(Bucket=server.bucket, Key=thumbnail_key(image_id))["Body"].read()
    assert Image.open(io.BytesIO(download.content)).size == (96, 72)


async def without_thumbnail(server, s3, image_id: str) -> None:
    """Make an image look indexed before thumbnails existed: no flag in its point, no thumbnail object."""
    index = server.services.index
    record, vector = await index.get(image_id), await index.vector(image_id)
    await index.upsert([(msgspec.structs.replace(record, thumbnail=False), vector)])
    s3.client.delete_object(Bucket=server.bucket, Key=thumbnail_key(image_id))


async def test_a_missing_thumbnail_is_made_on_the_first_request(server, s3):
    created = (await upload(server.client, encoded(34, "JPEG", (640, 480)), "old.jpg", "image/jpeg")).json()
    await without_thumbnail(server, s3, created["id"])
    assert thumbnail_key(created["id"]) not in s3.keys(server.bucket, "images/thumbs/")

    first = await server.client.get(f"/v1/images/{created['id']}/thumbnail")
    assert (first.status_code, first.headers["x-thumbnail"]) == (307, "made")
    thumbnail = stored_thumbnail(s3, server.bucket, created["id"])
    assert (thumbnail.format, thumbnail.size) == ("WEBP", (384, 288))
    again = await server.client.get(f"/v1/images/{created['id']}/thumbnail")
    assert (again.status_code, again.headers["x-thumbnail"]) == (307, "stored")


async def test_thumbnail_of_an_unknown_image_or_a_lost_original_is_a_404(server, s3):
    for unknown in ("0b6f0a3e-6c1f-4d7e-9d43-2f1de1f3a7c5", "not-a-uuid"):
        response = await server.client.get(f"/v1/images/{unknown}/thumbnail")
        assert (response.status_code, response.json()["code"]) == (404, "image_not_found")
    created = (await upload(server.client, encoded(35, "PNG"), "lost.png")).json()
    await without_thumbnail(server, s3, created["id"])
    s3.client.delete_object(Bucket=server.bucket, Key=created["r2_key"])
    response = await server.client.get(f"/v1/images/{created['id']}/thumbnail")
    assert (response.status_code, response.json()["code"]) == (404, "original_not_found")
    assert created["r2_key"] in response.json()["message"]


async def test_an_image_deleted_while_its_thumbnail_is_made_keeps_no_thumbnail(server, s3, monkeypatch):
    """DELETE removes the original, the thumbnail, then the point; a thumbnail made from an original read just
    before would be written after it all and never removed: it is removed again, and the request is a 404."""
    created = (await upload(server.client, encoded(37, "PNG"), "going.png")).json()
    await without_thumbnail(server, s3, created["id"])
    store, real_get = server.services.store, server.services.store.get

    async def get_then_delete(key: str, *args: object, **options: object) -> object:
        found = await real_get(key, *args, **options)
        if key == created["r2_key"]:
            deleted = await server.client.delete(f"/v1/images/{created['id']}")
            assert deleted.status_code == 204, deleted.text
        return found

    monkeypatch.setattr(store, "get", get_then_delete)
    response = await server.client.get(f"/v1/images/{created['id']}/thumbnail")
    assert (response.status_code, response.json()["code"]) == (404, "original_not_found"), response.text
    assert thumbnail_key(created["id"]) not in s3.keys(server.bucket, "images/thumbs/")


async def test_similar_ranks_other_images_and_leaves_the_image_out(server, uploaded):
    picture = Image.open(io.BytesIO(encoded(36, "PNG", (320, 240))))
    twin_bytes = io.BytesIO()
    picture.save(twin_bytes, format="JPEG", quality=60)  # the same picture, re-encoded
    original = (await upload(server.client, encoded(36, "PNG", (320, 240)), "original.png")).json()
    twin = (await upload(server.client, twin_bytes.getvalue(), "twin.jpg", "image/jpeg")).json()

    response = await server.client.get(f"/v1/images/{original['id']}/similar", params={"limit": 4})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 4
    assert original["id"] not in [hit["id"] for hit in results]
    assert results[0]["id"] == twin["id"]
    scores = [hit["score"] for hit in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["thumbnail_url"].endswith(f"/v1/images/{twin['id']}/thumbnail")

    pngs = await server.client.get(
        f"/v1/images/{original['id']}/similar", params={"limit": 100, "content_type": "image/png"}
    )
    assert pngs.status_code == 200, pngs.text
    ids = [hit["id"] for hit in pngs.json()["results"]]
    assert twin["id"] not in ids and original["id"] not in ids and ids


async def test_similar_to_an_unknown_image_is_a_404(server):
    for unknown in ("0b6f0a3e-6c1f-4d7e-9d43-2f1de1f3a7c5", "not-a-uuid"):
        response = await server.client.get(f"/v1/images/{unknown}/similar")
        assert (response.status_code, response.json()["code"]) == (404, "image_not_found")


async def test_async_upload_is_accepted_then_indexed(server):
    data = encoded(77, "PNG")
    response = await upload(server.client, data, "later.png", wait="false")
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert response.headers["location"] == body["status_url"]
    assert body["status_url"].endswith(f"/v1/jobs/{body['job_id']}")
    statuses = []
    for _ in range(200):
        job = (await server.client.get(body["status_url"])).json()
        statuses.append(job["status"])
        if job["status"] == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert statuses[-1] == "succeeded"
    assert set(statuses) <= {"queued", "running", "succeeded"}
    assert job["result"]["id"] == body["job_id"]
    assert job["params"]["filename"] == "later.png"
    record = await server.client.get(f"/v1/images/{body['job_id']}")
    assert record.status_code == 200
    assert job["result"] == record.json(), "the job's result is the image record, as GET /v1/images/{id} shows it"


async def test_delete_removes_object_and_point(server, s3):
    data = encoded(4242, "PNG")
    created = (await upload(server.client, data, "doomed.png")).json()
    image_id, key = created["id"], created["r2_key"]
    assert key in s3.keys(server.bucket, "images/originals/")
    assert thumbnail_key(image_id) in s3.keys(server.bucket, "images/thumbs/")

    response = await server.client.delete(f"/v1/images/{image_id}")
    assert response.status_code == 204
    assert key not in s3.keys(server.bucket, "images/originals/")
    assert thumbnail_key(image_id) not in s3.keys(server.bucket, "images/thumbs/")
    assert (await server.client.get(f"/v1/images/{image_id}")).status_code == 404
    hits = await server.client.post(
        "/v1/images/search/by-image", files={"file": ("q.png", data, "image/png")}, params={"limit": 100}
    )
    assert image_id not in [hit["id"] for hit in hits.json()["results"]]
    again = await server.client.delete(f"/v1/images/{image_id}")
    assert again.status_code == 404
    assert again.json()["code"] == "image_not_found"


async def test_health_and_readiness(server):
    assert (await server.client.get("/healthz")).json() == {"status": "ok"}
    ready = await server.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "broker": "ok",
        "processor": "ok",
        "storage": "ok",
        "clip_model": "ok",
        "qdrant": "ok",
    }


async def test_openapi_schema_lists_the_endpoints(server):
    schema = (await server.client.get("/schema/openapi.json")).json()
    for path in (
        "/v1/images",
        "/v1/images/search",
        "/v1/images/search/by-image",
        "/v1/images/{image_id}/file",
        "/v1/images/{image_id}/thumbnail",
        "/v1/images/{image_id}/similar",
    ):
        assert path in schema["paths"]


async def test_an_upload_retried_with_its_idempotency_key_finds_the_same_image(server, s3, monkeypatch):
    """The image's id comes from the key: a retry (or the same upload sent three times at once) answers with the
    one image, and stores one original; another file under the same key is refused, and so is the retry of an
    upload deleted since (it is not brought back); a full index does not refuse the retry of an upload it holds."""
    index = server.services.index
    data = encoded(5151, "JPEG")
    before_count = await index.count()
    before_keys = set(s3.keys(server.bucket, "images/originals/"))

    async def keyed(key: str, body: bytes = data, **params):
        return await server.client.post(
            "/v1/images",
            files={"file": ("retried.jpg", body, "image/jpeg")},
            params=params,
            headers={"Idempotency-Key": key},
        )

    first = await keyed("upload-once")
    assert first.status_code == 201, first.text
    at_once = await asyncio.gather(*(keyed("upload-at-once") for _ in range(3)))
    assert [response.status_code for response in at_once] == [201] * 3
    assert len({response.json()["id"] for response in at_once}) == 1
    retry = await keyed("upload-once")
    assert retry.status_code == 201 and retry.json() == first.json()
    assert await index.count() == before_count + 2
    assert len(set(s3.keys(server.bucket, "images/originals/")) - before_keys) == 2

    other = await keyed("upload-once", encoded(5152, "JPEG"))
    assert (other.status_code, other.json()["code"]) == (409, "idempotency_key_reused")

    queued = await keyed("upload-later", wait="false")
    assert queued.status_code == 202
    waited = await keyed("upload-later")
    assert waited.status_code == 201 and waited.json()["id"] == queued.json()["job_id"]

    assert (await server.client.delete(f"/v1/images/{waited.json()['id']}")).status_code == 204
    deleted = await keyed("upload-later")
    assert (deleted.status_code, deleted.json()["code"]) == (409, "image_deleted")
    assert (await server.client.get(f"/v1/images/{waited.json()['id']}")).status_code == 404

    full = dataclasses.replace(server.services.settings, image_search_max_elements=await index.count())
    monkeypatch.setattr(server.services, "settings", full)
    assert (await keyed("upload-once")).json() == first.json()
    refused = await keyed("upload-new")
    assert (refused.status_code, refused.json()["code"]) == (409, "index_full")
