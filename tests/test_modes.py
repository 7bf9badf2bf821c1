"""Feature toggles, readiness, model identity and the module layering."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from api.services import Services
from launcher import OneProcess
from tests.support.images import encoded
from tests.support.rabbitmq import free_port
from tests.support.s3 import S3Process
from tests.support.server import running_server

ROOT = Path(__file__).resolve().parent.parent


async def test_search_disabled_answers_503_and_loads_no_model(make_settings):
    async with running_server(make_settings(IMAGE_SEARCH_ENABLED="0")) as server:
        assert server.services.queries is None
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
    """infra at the bottom; contract and models above it; api and processor siblings over them; the launcher on
    top (DESIGN.md)."""
    ours = {"api", "processor", "infra", "contract", "models", "launcher"}
    assert _imports("infra") & ours == {"infra"}
    assert _imports("contract") & ours <= {"contract", "infra"}
    assert _imports("models") & ours <= {"models", "contract", "infra"}
    assert _imports("api") & ours <= {"api", "contract", "models", "infra"}
    assert _imports("processor") & ours <= {"processor", "contract", "models", "infra"}
    assert "launcher" not in _imports("api") | _imports("processor")


def test_model_libraries_are_imported_only_by_the_processes_that_load_those_models():
    """An API-only process imports no generation, voice or processor code; neither it nor a processor imports a
    model library (open_clip, diffusers, qwen_tts) before it loads that model, so a processor of one capability
    never pays for the others' libraries."""
    probe = (
        "import json, sys\n"
        "def loaded(): return sorted({m.split('.')[0] for m in sys.modules})\n"
        "import api.__main__, api.app, api.services\n"
        "api = loaded()\n"
        "import processor.__main__, processor.service\n"
        "sys.stdout.write(json.dumps([api, loaded()]))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    api, both = (set(modules) for modules in json.loads(result.stdout))
    assert not api & {"diffusers", "qwen_tts", "processor", "launcher"}
    assert not both & {"open_clip", "diffusers", "qwen_tts"}


async def test_a_processor_that_fails_to_stop_still_lets_the_api_stop(make_settings, monkeypatch):
    """One process: the API's stop (its resender, its reply queue) and the plumbing's close run even when the
    processor's stop raises."""
    running = await OneProcess.start(make_settings(), with_processor=True)
    processor, stopped = running.processor, []
    api_stop = Services.stop

    class Unstoppable:
        async def stop(self) -> None:
            raise RuntimeError("the processor could not stop")

    async def api_stops(services: Services) -> None:
        stopped.append("api")
        await api_stop(services)

    monkeypatch.setattr(running, "processor", Unstoppable())
    monkeypatch.setattr(Services, "stop", api_stops)
    try:
        with pytest.raises(RuntimeError, match="could not stop"):
            await running.stop()
        assert stopped == ["api"]
    finally:
        await processor.stop()
