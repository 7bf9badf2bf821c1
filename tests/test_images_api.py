"""Image search end to end: real RabbitMQ, the S3 API over HTTP (moto), embedded Qdrant, tiny CLIP."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support.images import encoded
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
    assert set(statuses) <= {"queued", "succeeded"}
    assert job["result"]["id"] == body["job_id"]
    assert job["params"]["filename"] == "later.png"
    record = await server.client.get(f"/v1/images/{body['job_id']}")
    assert record.status_code == 200


async def test_delete_removes_object_and_point(server, s3):
    data = encoded(4242, "PNG")
    created = (await upload(server.client, data, "doomed.png")).json()
    image_id, key = created["id"], created["r2_key"]
    assert key in s3.keys(server.bucket, "images/originals/")

    response = await server.client.delete(f"/v1/images/{image_id}")
    assert response.status_code == 204
    assert key not in s3.keys(server.bucket, "images/originals/")
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
    for path in ("/v1/images", "/v1/images/search", "/v1/images/search/by-image", "/v1/images/{image_id}/file"):
        assert path in schema["paths"]
