"""The production topology in one test process: an API alone, and processors per capability on one broker, each
with its own connection, as separate services would be."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from infra.broker import queue_depths
from infra.settings import Settings
from infra.startup import StartupError
from processor.service import ProcessorService
from tests.support.amqp import wait_until
from tests.support.images import encoded
from tests.support.server import running_server


@contextlib.asynccontextmanager
async def processors(env: dict[str, str], *capabilities: str) -> AsyncIterator[list[ProcessorService]]:
    """One processor per entry of `capabilities` (each a PROCESSOR_CAPABILITIES value), started in order."""
    started: list[ProcessorService] = []
    try:
        for value in capabilities:
            started.append(await ProcessorService.start(Settings.from_env({**env, "PROCESSOR_CAPABILITIES": value})))
        yield started
    finally:
        for service in reversed(started):
            await service.stop()


async def test_processors_with_different_capabilities_each_get_only_their_jobs(make_env, rabbit):
    env = make_env(IMAGE_ENABLED="1")
    async with processors(env, "index", "image") as (indexer, generator):
        assert indexer.runtime.generator is None and generator.runtime.clip is None
        assert set(await indexer.readiness()) == {"processor", "clip_model", "qdrant"}
        assert set(await generator.readiness()) == {"processor", "image_model"}
        async with running_server(Settings.from_env(env), with_processor=False) as api:
            assert api.processor is None
            assert api.services.queries is not None and not api.services.queries.image_tower
            ready = (await api.client.get("/readyz")).json()
            assert ready["status"] == "ready" and "processor" not in ready["checks"]

            generated = await api.client.post("/v1/images/generate", json={"prompt": "two services", "seed": 5})
            assert generated.status_code == 200, generated.text
            uploaded = await api.client.post("/v1/images?wait=true", files={"file": ("a.png", encoded(3), "image/png")})
            assert uploaded.status_code == 201, uploaded.text
            # search by example: the API holds the text tower only, so an indexing processor embeds the example
            found = await api.client.post(
                "/v1/images/search/by-image", files={"file": ("q.png", encoded(3), "image/png")}
            )
            assert found.status_code == 200, found.text
            assert found.json()["results"][0]["id"] == uploaded.json()["id"]
            assert (await api.client.post("/v1/images/search", json={"query": "a cat"})).status_code == 200

            counts = rabbit.queue_counts(env["VHOST"])
            assert counts["ams.dead"] == (0, 0), "nothing is refused as feature_disabled"
            assert counts["ams.image"] == counts["ams.index"] == counts["ams.voice"] == (0, 0)
            consumers = {name: found for name, (_, found) in (await _depths(api)).items() if name.startswith("ams.")}
            assert consumers["ams.index"] == 1 and consumers["ams.image"] == 1 and consumers["ams.voice"] == 0


async def _depths(api) -> dict[str, tuple[int, int]]:
    return await queue_depths(api.services.connection)


async def test_competing_image_processors_run_each_job_once(make_env, rabbit):
    env = make_env(IMAGE_ENABLED="1", IMAGE_SEARCH_ENABLED="0")
    async with (
        processors(env, "image", "image") as pair,
        running_server(Settings.from_env(env), with_processor=False) as api,
    ):
        assert (await _depths(api))["ams.image"][1] == 2
        queued = [
            await api.client.post(
                "/v1/jobs", json={"type": "image.generate", "params": {"prompt": f"job {n}", "seed": n}}
            )
            for n in range(20)
        ]
        assert all(response.status_code == 202 for response in queued)
        job_ids = [response.json()["job_id"] for response in queued]

        async def all_done() -> bool:
            states = [(await api.client.get(f"/v1/jobs/{job_id}")).json()["status"] for job_id in job_ids]
            return all(state == "succeeded" for state in states)

        await wait_until(all_done, timeout=120)
        store = pair[0].runtime.store
        outputs = sorted([info.key async for info in store.list("images/generated/")])
        assert outputs == sorted(f"images/generated/{job_id}.png" for job_id in job_ids)
        for job_id in job_ids:
            job = (await api.client.get(f"/v1/jobs/{job_id}")).json()
            assert job["attempts"] == 1, job
        assert rabbit.queue_counts(env["VHOST"])["ams.dead"] == (0, 0)


async def test_an_api_alone_refuses_to_start_without_the_index_owner(make_env):
    with pytest.raises(StartupError) as refused:
        async with running_server(Settings.from_env(make_env()), with_processor=False):
            pass
    assert "python -m processor" in str(refused.value) and "QDRANT_URL" in str(refused.value)
