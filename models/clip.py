"""The CLIP embedder (open_clip): image and text towers, L2-normalised float32 vectors.

A process that only embeds queries (the API) loads the text tower alone: the image tower is dropped right after
loading, so it holds a fraction of the memory. The weights run in CLIP_DTYPE (`auto`: bfloat16 on CUDA, float16
where bfloat16 is unsupported, float32 on the CPU); the vectors leave as float32 either way.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch
from PIL import Image

from infra.settings import Settings
from models.clip_inputs import DeviceInputs
from models.errors import DeviceMemoryError
from models.hub import route_library_output
from models.runner import ModelSource, Placement, on_device

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ClipSpec:
    """The open_clip model name, its pretrained tag (None: the name says where the weights are), and where from."""

    model_name: str
    pretrained: str | None
    source: ModelSource

    @property
    def model_id(self) -> str:
        return self.source.model_id


_SETTING = "CLIP_MODEL (local-dir:/path)"
# logged when a batch is embedded in halves: each such batch first fails whole
_SPLIT_HINT = "a lower IMAGE_SEARCH_BATCH_SIZE spares the failed whole-batch attempt"


def clip_spec(settings: Settings) -> ClipSpec:
    if settings.model_profile == "tiny":
        tiny = ModelSource.tiny("clip", settings.model_cache_dir, _SETTING)
        name = f"local-dir:{tiny.location}"
        return ClipSpec(name, None, ModelSource(name, tiny.model_id, local=True, setting=_SETTING))
    name = settings.clip_model
    if name.startswith(("local-dir:", "hf-hub:")) or not settings.clip_pretrained:
        return ClipSpec(name, None, ModelSource(name, name, local=name.startswith("local-dir:"), setting=_SETTING))
    pretrained = settings.clip_pretrained
    local = pretrained.endswith((".safetensors", ".bin", ".pt", ".pth", ".npz"))
    return ClipSpec(name, pretrained, ModelSource(name, f"{name}/{pretrained}", local=local, setting=_SETTING))


class ClipEmbedder:
    """Loaded once; thread-safe; call the embed methods from a worker thread, not the event loop."""

    def __init__(
        self,
        model: Any,
        preprocess: Any,
        tokenizer: Any,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        *,
        image_tower: bool,
        inputs_on_device: bool | None = None,
        jpeg_on_device: bool | None = None,
    ) -> None:
        """`inputs_on_device`: resize, crop and normalise images on the device (models/clip_inputs.py) rather than
        with open_clip's Pillow transforms; by default on CUDA, where the model's preprocessing allows.
        `jpeg_on_device`: with inputs made on the device, decode plain JPEGs there too (nvJPEG); by default on CUDA."""
        self._model = model.to(dtype=dtype)
        self._preprocess = preprocess
        self._tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        on_device = device.type == "cuda" if inputs_on_device is None else inputs_on_device
        config = getattr(model.visual, "preprocess_cfg", None) if image_tower else None
        self._device_inputs = DeviceInputs.from_config(config) if on_device else None
        jpeg = device.type == "cuda" if jpeg_on_device is None else jpeg_on_device
        self.decodes_jpeg = jpeg and self._device_inputs is not None
        self._lock = threading.Lock()
        self.image_tower = image_tower
        self.model_id = model_id
        self.dim = self._probe_dim()

    @classmethod
    def load(cls, settings: Settings, *, image_tower: bool = True) -> ClipEmbedder:
        """Load the model; with image_tower=False only the text tower stays in memory (embed_images refuses)."""
        route_library_output("transformers")  # open_clip's HF tokenizers log through transformers
        spec = clip_spec(settings)
        placement = Placement.choose(settings.torch_device, settings.clip_dtype)

        import open_clip  # here, not at the top: only a process that embeds imports it
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        def build() -> tuple[Any, Any, Any]:
            if spec.pretrained and not spec.source.local:
                # fetch (or find) the weights before building the model: offline and uncached, this fails in
                # milliseconds instead of after seconds of building a tower that cannot be loaded
                download_pretrained(get_pretrained_cfg(spec.model_name, spec.pretrained))
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model_name, pretrained=spec.pretrained, device=placement.device
            )
            return model, preprocess, open_clip.get_tokenizer(spec.model_name)

        model, preprocess, tokenizer = spec.source.load("CLIP model", build)
        model.eval()
        if not image_tower:
            model.visual = None
        embedder = cls(
            model, preprocess, tokenizer, spec.model_id, placement.device, placement.dtype, image_tower=image_tower
        )
        log.info("clip_loaded", model=spec.model_id, dim=embedder.dim, image_tower=image_tower, **placement.describe())
        return embedder

    def _probe_dim(self) -> int:
        """The vectors' length, from one forward pass of a tower this embedder holds."""
        if self.image_tower:
            size = self._model.visual.image_size
            height, width = (size, size) if isinstance(size, int) else size
            return int(self.embed_prepared([torch.zeros(3, height, width)]).shape[1])
        return int(self.embed_texts(["dimension probe"]).shape[1])

    @property
    def input_size(self) -> int:
        """The shorter side, in pixels, of what the image tower takes (an image is decoded no smaller)."""
        size = self._model.visual.image_size if self.image_tower else 0
        return int(min(size) if isinstance(size, (tuple, list)) else size)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """What the image tower's batch is made from, for one image; thread-safe, for decode workers. On the CPU the
        finished input (resized, cropped, normalised); with inputs made on the device, the uint8 pixels."""
        if self._device_inputs is not None:
            return DeviceInputs.pixels(image)
        return self._preprocess(image)

    def decode_jpegs(self, jpegs: Sequence[bytes]) -> list[torch.Tensor | None]:
        """With `decodes_jpeg`: plain JPEGs decoded on the device in one call into what `prepare` gives for them; None
        for one the decoder refuses. Call from a worker thread."""
        return self._jpeg_device().decode_jpegs(jpegs, self.device)

    def shrink(self, decoded: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Images `decode_jpegs` gave, scaled on the device to the (width, height) of each in `sizes`, as uint8 RGB
        arrays (rows first) on the CPU: what their thumbnails are encoded from. Call from a worker thread;
        DeviceMemoryError when the device has no memory for it."""
        scaler = self._jpeg_device()
        return on_device("the thumbnail scaler", self.device, lambda: scaler.shrink(decoded, sizes))

    def _jpeg_device(self) -> DeviceInputs:
        if self._device_inputs is None or not self.decodes_jpeg:
            raise RuntimeError("this CLIP embedder does not decode JPEGs on its device")
        return self._device_inputs

    def embed_prepared(self, inputs: Sequence[torch.Tensor]) -> np.ndarray:
        """One batched forward pass of the image tower over `prepare`d inputs; one row per image. A batch the
        device has no memory for is embedded in halves (each halved again as needed); DeviceMemoryError when one
        image alone does not fit."""
        if not self.image_tower:
            raise RuntimeError("this CLIP embedder holds the text tower only (loaded with image_tower=False)")
        inputs = list(inputs)
        try:
            return on_device("the CLIP image tower", self.device, lambda: self._embed_batch(inputs))
        except DeviceMemoryError as exc:
            if len(inputs) == 1:
                raise
            log.warning("clip_batch_split", images=len(inputs), error=str(exc), hint=_SPLIT_HINT)
        half = len(inputs) // 2
        return np.concatenate([self.embed_prepared(inputs[:half]), self.embed_prepared(inputs[half:])])

    def _embed_batch(self, inputs: list[torch.Tensor]) -> np.ndarray:
        with self._lock, torch.inference_mode():
            if self._device_inputs is not None:
                batch = self._device_inputs.batch(inputs, self.device, self.dtype)
            else:
                batch = torch.stack(inputs).to(self.device, dtype=self.dtype)
            features = self._model.encode_image(batch)
        return _normalise(features)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_prepared([self.prepare(image) for image in images])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return on_device("the CLIP text tower", self.device, lambda: self._embed_texts(texts))

    def _embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self._tokenizer(list(texts)).to(self.device)
        with self._lock, torch.inference_mode():
            features = self._model.encode_text(tokens)
        return _normalise(features)


def _normalise(features: torch.Tensor) -> np.ndarray:
    array = features.float().cpu().numpy()
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, 1e-12)
