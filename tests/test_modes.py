"""Feature toggles, readiness, model identity and the module layering."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import structlog

from api.services import Services
from infra import readiness
from infra.readiness import Failed, ReadinessLog, probe
from infra.storage import StorageError, StorageUnavailableError
from infra.vectors import EngineProtocolMismatchError, VectorIndexUnavailableError
from launcher import OneProcess
from processor.health import create_health_app
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


async def test_readyz_says_a_failing_checks_state_and_logs_its_error_once(make_settings, tmp_path):
    """/readyz is open: a failing check's error (local storage's names its directory) is logged, once while its
    state holds, and the body says only the state; the same on the processor's port. Its recovery is logged once."""
    storage = tmp_path / "secret-internal-7f3a" / "storage"
    async with running_server(make_settings(LOCAL_STORAGE_DIR=str(storage))) as server:
        health = create_health_app(server.processor)
        transport = httpx.ASGITransport(app=health)
        async with httpx.AsyncClient(transport=transport, base_url="http://processor") as processor:
            with structlog.testing.capture_logs() as logs:
                (storage / "objects").rename(storage / "away")
                try:
                    answers = [await client.get("/readyz") for client in (server.client, processor) * 3]
                finally:
                    (storage / "away").rename(storage / "objects")
                recovered = await server.client.get("/readyz")

    for answer in answers:
        assert answer.status_code == 503
        assert "secret-internal-7f3a" not in answer.text
        body = answer.json()
        assert (body["status"], body["failing"], body["checks"]["storage"]) == ("not_ready", ["storage"], "unavailable")
    assert recovered.status_code == 200
    failing = [entry for entry in logs if entry["event"] == "readiness_check_failing"]
    assert [(entry["check"], entry["state"]) for entry in failing] == [("storage", "unavailable")] * 2, logs
    assert all("secret-internal-7f3a" in entry["error"] for entry in failing), failing
    ok = [entry for entry in logs if entry["event"] == "readiness_check_ok"]
    assert [(entry["check"], entry["was"]) for entry in ok] == [("storage", "unavailable")], logs


@pytest.mark.parametrize(
    ("error", "state"),
    [
        (StorageUnavailableError("bucket 'internal-bucket' does not exist"), "unavailable"),
        (VectorIndexUnavailableError("qdrant at http://10.0.0.7:6333 is unreachable"), "unavailable"),
        (EngineProtocolMismatchError("the engine at /srv/index speaks index protocol 1, this 2"), "restart needed"),
        (StorageError("object store refused 'internal-bucket': AccessDenied (403)"), "refused"),
        (RuntimeError("unexpected at /srv/internal"), "error"),
    ],
)
async def test_a_failed_probe_says_what_kind_of_failure_and_keeps_the_error_for_the_log(error, state):
    async def failing() -> None:
        raise error

    found = await probe(failing())
    assert (str(found), found.error) == (state, f"{type(error).__name__}: {error}")


def test_a_failing_checks_changed_error_is_logged_again_at_most_once_per_interval(monkeypatch):
    states = ReadinessLog()
    with structlog.testing.capture_logs() as logs:
        for attempt in range(3):
            states.record({"storage": Failed("unavailable", f"cause {attempt}")})
        monkeypatch.setattr(readiness, "ERROR_LOG_INTERVAL_SECONDS", 0.0)
        states.record({"storage": Failed("unavailable", "cause 3")})
        states.record({"storage": Failed("unavailable", "cause 3")})
    assert [(entry["event"], entry["error"]) for entry in logs] == [
        ("readiness_check_failing", "cause 0"),
        ("readiness_check_failing", "cause 3"),
    ]


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
