"""Filters on search, search by image and the listing: source, content type and creation time, end to end."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlparse

import pytest
import torch

from contract.messages import IMAGE_INDEX
from tests.support.amqp import publish, wait_until
from tests.support.images import encoded
from tests.support.server import running_server


@pytest.fixture(scope="module")
async def server(make_settings):
    async with running_server(make_settings()) as running:
        yield running


@pytest.fixture(scope="module")
async def images(server):
    """Two PNG and two JPEG uploads, then two images from an upstream system with source catalog-sync."""
    records = []
    for seed, (fmt, mime) in enumerate([("PNG", "image/png"), ("JPEG", "image/jpeg")] * 2):
        response = await server.client.post("/v1/images", files={"file": (f"f{seed}", encoded(2000 + seed, fmt), mime)})
        assert response.status_code == 201, response.text
        records.append(response.json())
    index = server.services.index
    for seed in (10, 11):
        body = {"data": base64.b64encode(encoded(2000 + seed)).decode(), "source": "catalog-sync"}
        await publish(server.services.settings.amqp_url, IMAGE_INDEX, body)

    async def all_there() -> bool:
        return await index.count() == 6

    await wait_until(all_there)
    listed = (await server.client.get("/v1/images", params={"limit": 6})).json()
    return list(reversed(listed))  # oldest first


async def search(server, **filters):
    response = await server.client.post("/v1/images/search", json={"query": "anything", "limit": 10, "filter": filters})
    assert response.status_code == 200, response.text
    return {hit["id"] for hit in response.json()["results"]}


async def test_search_filters_by_source_content_type_and_time(server, images):
    catalog = {r["id"] for r in images if r["source"] == "catalog-sync"}
    assert len(catalog) == 2
    assert await search(server, source="catalog-sync") == catalog
    assert await search(server, source=["upload", "catalog-sync"]) == {r["id"] for r in images}
    jpegs = {r["id"] for r in images if r["content_type"] == "image/jpeg"}
    assert len(jpegs) == 2
    assert await search(server, content_type="image/jpeg") == jpegs
    assert await search(server, source="upload", content_type=["image/png"]) == {
        r["id"] for r in images if r["source"] == "upload" and r["content_type"] == "image/png"
    }
    third = images[2]["created_at"]
    assert await search(server, created_after=third) == {r["id"] for r in images[3:]}
    assert await search(server, created_before=third) == {r["id"] for r in images[:2]}
    assert await search(server, created_after=images[0]["created_at"], created_before=images[3]["created_at"]) == {
        r["id"] for r in images[1:3]
    }
    assert await search(server, source="nobody") == set()
    # an empty or inverted time range matches nothing (the document cannot say "after < before", so it is no error)
    assert await search(server, created_after=third, created_before=third) == set()
    assert await search(server, created_after=images[3]["created_at"], created_before=third) == set()


async def test_search_by_image_takes_the_filters_as_query_parameters(server, images):
    response = await server.client.post(
        "/v1/images/search/by-image",
        files={"file": ("q", encoded(2000), "image/png")},
        params=[("limit", "10"), ("content_type", "image/png"), ("source", "upload")],
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["id"] == images[0]["id"]
    assert {hit["id"] for hit in results} == {
        r["id"] for r in images if r["source"] == "upload" and r["content_type"] == "image/png"
    }


async def test_listing_filters_and_keeps_them_in_the_next_link(server, images):
    uploads = [r["id"] for r in reversed(images) if r["source"] == "upload"]
    seen: list[str] = []
    params: list[tuple[str, str]] = [("limit", "1"), ("source", "upload")]
    while True:
        response = await server.client.get("/v1/images", params=params)
        assert response.status_code == 200, response.text
        seen += [item["id"] for item in response.json()]
        if "X-Next-Cursor" not in response.headers:
            break
        link = response.headers["Link"].split(">")[0].lstrip("<")
        query = parse_qs(urlparse(link).query)
        assert query["source"] == ["upload"]
        params = [(name, value) for name, values in query.items() for value in values]
    assert seen == uploads
    after = images[3]["created_at"]
    response = await server.client.get("/v1/images", params={"created_after": after})
    assert [item["id"] for item in response.json()] == [r["id"] for r in reversed(images[4:])]


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"created_after": "yesterday"}, "created_after: 'yesterday' is not an ISO-8601 time"),
        ({"source": "no spaces please"}, "source: 'no spaces please' is not a valid value"),
        ({"content_type": "png"}, "content_type: 'png' is not a valid value (e.g. image/png)"),
        ({"source": []}, "source: give 1 to 20 values"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_bad_filters_are_a_400_that_names_the_field(server, filters, message):
    response = await server.client.post("/v1/images/search", json={"query": "x", "filter": filters})
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_request"
    assert message in response.json()["message"]


async def test_bad_listing_filters_are_a_400(server):
    response = await server.client.get("/v1/images", params={"created_before": "soon"})
    assert response.status_code == 400
    assert "created_before" in response.json()["message"]


async def test_the_document_gives_each_filter_form_its_own_schema(server):
    """A query parameter or a header is text, never null, and a filter's one value is an array of one: the document
    says so (with null in a one-of, schemathesis's long run, scripts/fuzz.sh, counted `?source=false` as invalid
    data the server accepted). In a JSON body the same filter takes a string, an array or null."""
    document = (await server.client.get("/schema/openapi.json")).json()
    for path in ("/v1/images", "/v1/images/{image_id}/similar"):
        parameters = {p["name"]: p["schema"] for p in document["paths"][path]["get"]["parameters"]}
        for name in ("source", "content_type"):
            schema = parameters[name]
            assert schema["type"] == "array", (path, name, schema)
            assert schema["items"]["type"] == "string" and schema["items"]["pattern"]
            assert (schema["minItems"], schema["maxItems"]) == (1, 20)
        assert parameters["cursor" if path == "/v1/images" else "created_after"]["type"] == "string"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", ()):
                assert "oneOf" not in parameter["schema"], (method, path, parameter)
    body = document["components"]["schemas"]["SearchFilter"]["properties"]["source"]
    assert {choice["type"] for choice in body["oneOf"]} == {"string", "array", "null"}


async def test_a_query_the_device_has_no_memory_for_is_a_503_with_retry_after(server, monkeypatch):
    """The text tower running out of device memory is a dependency out of capacity, not a server bug."""

    def no_memory(tokens: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(server.services.queries._clip._model, "encode_text", no_memory)
    response = await server.client.post("/v1/images/search", json={"query": "anything"})
    assert (response.status_code, response.json()["code"]) == (503, "device_memory_unavailable"), response.text
    assert "CLIP text tower ran out of memory" in response.json()["message"]
    assert int(response.headers["retry-after"]) > 0
