"""The text-to-image runner: any diffusers text-to-image pipeline, loaded once, one image at a time."""

from __future__ import annotations

import inspect
import io
import threading
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from infra.settings import Settings
from models.hub import route_library_output
from models.runner import ModelSource, Placement, on_device

log = structlog.get_logger(__name__)


class UnsupportedParameterError(ValueError):
    """The loaded pipeline does not accept a parameter the job asked for."""


@dataclass(frozen=True, slots=True)
class GenerationParams:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int


class ImageGenerator:
    """Loaded once; `generate` runs in a worker thread and holds a lock, so inference is one at a time."""

    def __init__(self, pipeline: Any, model_id: str, placement: Placement) -> None:
        self._pipeline = pipeline
        self._lock = threading.Lock()
        self._accepts = set(inspect.signature(pipeline.__call__).parameters)
        self.model_id = model_id
        self.device, self.dtype = placement.device, placement.dtype

    @classmethod
    def load(cls, settings: Settings) -> ImageGenerator:
        placement = Placement.choose(settings.torch_device, settings.image_dtype)
        route_library_output("transformers", "diffusers")  # before the tiny build too: saving a model draws a bar
        source = ModelSource.pick(
            settings,
            configured=settings.image_model,
            setting="IMAGE_MODEL (a local folder)",
            tiny="diffusion",
        )
        from diffusers import DiffusionPipeline  # here, not at the top: only a process that generates imports it

        pipeline = source.load(
            "image model", lambda: DiffusionPipeline.from_pretrained(source.location, dtype=placement.dtype)
        )
        pipeline = pipeline.to(placement.device)
        pipeline.set_progress_bar_config(disable=True)
        log.info("image_model_loaded", model=source.model_id, pipeline=type(pipeline).__name__, **placement.describe())
        return cls(pipeline, source.model_id, placement)

    def generate(self, params: GenerationParams) -> bytes:
        """One image as PNG bytes. Same parameters and seed on the same model and device give the same bytes;
        DeviceMemoryError when the device has no memory for it."""
        kwargs: dict[str, Any] = {
            "prompt": params.prompt,
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance_scale,
        }
        if params.negative_prompt:
            if "negative_prompt" not in self._accepts:
                raise UnsupportedParameterError(f"model {self.model_id!r} does not take a negative_prompt")
            kwargs["negative_prompt"] = params.negative_prompt
        image = on_device("the image model", self.device, lambda: self._run(kwargs, params.seed))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def _run(self, kwargs: dict[str, Any], seed: int) -> Any:
        with self._lock, torch.inference_mode():
            generator = torch.Generator(device=self.device).manual_seed(seed)
            return self._pipeline(**kwargs, generator=generator).images[0]
