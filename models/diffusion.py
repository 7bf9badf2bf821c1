"""The text-to-image runner: any diffusers text-to-image pipeline, loaded once, one image at a time."""

from __future__ import annotations

import inspect
import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from diffusers import DiffusionPipeline

from infra.settings import Settings
from models.device import pick_device, pick_dtype
from models.errors import ModelLoadError
from models.hub import hub_reachable, offline_hint, prefer_local_cache, route_library_output
from models.tiny_diffusion import TINY_DIFFUSION_ID, ensure_tiny_diffusion

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

    def __init__(self, pipeline: Any, model_id: str, device: torch.device) -> None:
        self._pipeline = pipeline
        self._device = device
        self._lock = threading.Lock()
        self._accepts = set(inspect.signature(pipeline.__call__).parameters)
        self.model_id = model_id

    @classmethod
    def load(cls, settings: Settings) -> ImageGenerator:
        device = pick_device(settings.torch_device)
        dtype = pick_dtype(settings.image_dtype, device)
        route_library_output("transformers", "diffusers")  # before the tiny build too: saving a model draws a bar
        if settings.model_profile == "tiny":
            source, model_id = str(ensure_tiny_diffusion(settings.model_cache_dir)), TINY_DIFFUSION_ID
        else:
            source = model_id = settings.image_model
        local = _is_local(source)
        if not local:
            prefer_local_cache()
        try:
            pipeline = DiffusionPipeline.from_pretrained(source, dtype=dtype)
        except Exception as exc:
            if not local and not hub_reachable():
                raise ModelLoadError(
                    f"cannot load image model {model_id!r}: {offline_hint('IMAGE_MODEL (a local folder)')}"
                ) from exc
            raise ModelLoadError(f"cannot load image model {model_id!r}: {exc}") from exc
        pipeline = pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        log.info(
            "image_model_loaded",
            model=model_id,
            pipeline=type(pipeline).__name__,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
        )
        return cls(pipeline, model_id, device)

    def generate(self, params: GenerationParams) -> bytes:
        """One image as PNG bytes. Same parameters and seed on the same model and device give the same bytes."""
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
        with self._lock, torch.inference_mode():
            kwargs["generator"] = torch.Generator(device=self._device).manual_seed(params.seed)
            image = self._pipeline(**kwargs).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


def _is_local(source: str) -> bool:
    return Path(source).is_dir()
