"""The one interface every model runner (CLIP, diffusion, voice) has, and what loading them shares.

A runner is loaded once per process from the settings (`load`), says which model it holds (`model_id`, recorded
with what it produces), where it runs (`device`, `dtype`), and has predict methods of its own (`embed_*`,
`generate`, `clone`), called from a worker thread. Where the weights come from (the tiny profile's random-weight
builders in models/tiny/, a local folder, or the Hugging Face hub, offline when it cannot be reached), the device
and dtype choice, the error a failed load gives, and the one a predict call that runs out of device memory gives
(`on_device`: DeviceMemoryError) are decided here, once for all three. A runner imports its
model library (open_clip, diffusers, qwen_tts) when it loads, so a process imports only the libraries of the models
it serves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self, TypeVar

import torch

from infra.settings import Settings
from models.errors import DeviceMemoryError, ModelLoadError
from models.hub import hub_reachable, offline_hint, prefer_local_cache

Loaded = TypeVar("Loaded")
Result = TypeVar("Result")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on CUDA when supported, else float16 on CUDA, float32 on CPU."""
    if requested != "auto":
        return _DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_device(requested: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else is passed to torch as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def on_device(what: str, device: torch.device, call: Callable[[], Result]) -> Result:
    """Run a model call; torch's out-of-memory error leaves as DeviceMemoryError, raised once the failed call's
    tensors are unreferenced and the allocator's cached blocks released, so a smaller call (or another process on
    the device) can have the memory at once."""
    try:
        return call()
    except torch.OutOfMemoryError as exc:
        failure = str(exc).splitlines()[0] if str(exc) else "out of memory"
    # out of the except block: its traceback, and the tensors its frames held, are gone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    raise DeviceMemoryError(f"{what} ran out of memory on {device}: {failure}")


class ModelRunner(Protocol):
    model_id: str  # recorded with the runner's outputs
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, settings: Settings) -> Self:
        """Load the configured model (MODEL_PROFILE, the runner's own settings); ModelLoadError when it cannot."""
        ...


@dataclass(frozen=True, slots=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def choose(cls, device: str, dtype: str) -> Placement:
        """TORCH_DEVICE and the runner's dtype setting ('auto': bfloat16 on CUDA where supported, else float16 on
        CUDA, float32 on the CPU)."""
        chosen = pick_device(device)
        return cls(chosen, pick_dtype(dtype, chosen))

    def describe(self) -> dict[str, str]:
        """For the `*_loaded` log line."""
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a runner's weights come from."""

    location: str  # what the library loads from: a folder, a hub id, an open_clip name
    model_id: str  # the name recorded with outputs
    local: bool  # on disk: the hub is never asked
    setting: str  # how to point at local weights, for the error when the hub is out of reach

    @classmethod
    def tiny(cls, name: str, cache_dir: Path, setting: str) -> ModelSource:
        """The tiny profile's random-weight model `name` (models/tiny/<name>.py), built into `cache_dir` once."""
        builder = importlib.import_module(f"models.tiny.{name}")
        return cls(str(builder.ensure(cache_dir)), builder.MODEL_ID, local=True, setting=setting)

    @classmethod
    def pick(cls, settings: Settings, *, configured: str, setting: str, tiny: str) -> ModelSource:
        """The tiny model `tiny` under MODEL_PROFILE=tiny, else the configured one (a local folder or a hub id)."""
        if settings.model_profile == "tiny":
            return cls.tiny(tiny, settings.model_cache_dir, setting)
        return cls(configured, configured, local=Path(configured).is_dir(), setting=setting)

    def load(self, kind: str, build: Callable[[], Loaded]) -> Loaded:
        """Run `build` (the library's own loading code), from the local cache alone when the hub is out of reach;
        any failure becomes a ModelLoadError that says what to set."""
        if not self.local:
            prefer_local_cache()
        try:
            return build()
        except Exception as exc:
            if not self.local and not hub_reachable():
                raise ModelLoadError(f"cannot load {kind} {self.model_id!r}: {offline_hint(self.setting)}") from exc
            raise ModelLoadError(f"cannot load {kind} {self.model_id!r}: {exc}") from exc
