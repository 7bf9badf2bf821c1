"""Feature toggles, readiness, model identity and the module layering."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.images import encoded
from tests.support.rabbitmq import free_port
from tests.support.s3 import S3Process
from tests.support.server import running_server

ROOT = Path(__file__).resolve().parent.parent


async def test_search_disabled_answers_503_and_loads_no_model(make_settings):
    async with running_server(make_settings(IMAGE_SEARCH_ENABLED="0")) as server:
        assert server.services.runtime.clip is None
        for response in (
            await server.client.post("/v1/images/search", json={"query": "cat"}),
            await server.client.post("/v1/images", files={"file": ("a.png", encoded(1), "image/png")}),
            await server.client.get("/v1/images"),
        ):
            assert response.status_code == 503
            assert response.json()["code"] == "feature_disabled"
            assert "IMAGE_SEARCH_ENABLED" in response.json()["message"]
        ready = await server.client.get("/readyz")
        assert ready.status_code == 200
        assert "qdrant" not in ready.json()["checks"]


async def test_readyz_names_the_failing_part(make_settings):
    s3 = S3Process(free_port())
    try:
        s3.create_bucket("ready")
        async with running_server(make_settings(r2_bucket="ready", endpoint=s3.endpoint)) as server:
            assert (await server.client.get("/readyz")).status_code == 200
            s3.freeze()
            response = await server.client.get("/readyz")
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "not_ready"
            assert body["failing"] == ["storage"]
            assert body["checks"]["broker"] == "ok"
            s3.thaw()
            assert (await server.client.get("/readyz")).status_code == 200
    finally:
        s3.stop()


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_dependency_direction():
    assert not _imports("infra") & {"api", "processor"}
    assert "api" not in _imports("processor")
