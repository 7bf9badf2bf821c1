"""image.generate: run the text-to-image pipeline, store the PNG as images/generated/<job id>.png (seen at once,
flushed to a local disk after the answer: processor/outputs.py)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from contract.messages import (
    IMAGE_GENERATE,
    MAX_SEED,
    ContractError,
    ImageGenerateV1,
    check_generation_budget,
    output_key,
)
from infra.settings import Settings
from infra.storage import ObjectStore
from models.diffusion import GenerationParams, ImageGenerator, UnsupportedParameterError
from processor.handlers.base import Job
from processor.outcomes import Failed, Outcome, Succeeded
from processor.outputs import StoredOutput, keyed_output, store_output

log = structlog.get_logger(__name__)


def seed_for_job(job_id: str) -> int:
    """The seed of a job that did not name one: derived from its id, so a redelivery draws the same image."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") & MAX_SEED


def resolve(payload: ImageGenerateV1, job_id: str, settings: Settings) -> GenerationParams:
    """The job's parameters with the server's defaults filled in."""
    return GenerationParams(
        prompt=payload.prompt,
        negative_prompt=payload.negative_prompt,
        width=payload.width or settings.image_default_width,
        height=payload.height or settings.image_default_height,
        steps=payload.steps or settings.image_default_steps,
        guidance_scale=(
            payload.guidance_scale if payload.guidance_scale is not None else settings.image_default_guidance
        ),
        seed=payload.seed if payload.seed is not None else seed_for_job(job_id),
    )


class ImageGenerateHandler:
    message_type = IMAGE_GENERATE
    batch_size = 1
    always_record = True
    reports_running = True
    pipelined = False
    apart = False

    def __init__(self, *, store: ObjectStore, generator: ImageGenerator, settings: Settings) -> None:
        self._store = store
        self._generator = generator
        self._settings = settings

    def outputs(self, result: Mapping[str, Any]) -> tuple[str, ...]:
        return keyed_output(result)

    async def handle(self, jobs: Sequence[Job]) -> list[Outcome]:
        return [await self._one(job) for job in jobs]

    async def _one(self, job: Job) -> Outcome:
        try:
            check_generation_budget(job.payload, self._settings)
        except ContractError as exc:
            return Failed(exc.code, exc.message)
        params = resolve(job.payload, job.message_id, self._settings)
        try:
            png = await asyncio.to_thread(self._generator.generate, params)
        except UnsupportedParameterError as exc:
            return Failed("unsupported_parameter", str(exc))
        key = output_key(IMAGE_GENERATE, job.message_id)
        stored = await store_output(job, self._store, key, png, "image/png")
        if not isinstance(stored, StoredOutput):
            return stored
        png = stored.data
        log.info(
            "image_generated",
            job_id=job.message_id,
            key=key,
            width=params.width,
            height=params.height,
            steps=params.steps,
            seed=params.seed,
        )
        result = {
            "key": key,
            "content_type": "image/png",
            "size": len(png),
            "seed": params.seed,
            "width": params.width,
            "height": params.height,
            "steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "model": self._generator.model_id,
        }
        return Succeeded(result, attachment=png, unflushed=(key,), created=stored.created)
