"""The one model interface (models/runner.py): each runner loads from the settings and says which model it holds,
where and in which dtype (the tiny profile's models, on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.clip import ClipEmbedder
from models.diffusion import ImageGenerator
from models.errors import DeviceMemoryError
from models.runner import ModelRunner
from models.tiny import clip as tiny_clip
from models.tiny import diffusion as tiny_diffusion
from models.tiny import voice as tiny_voice
from models.voice import VoiceCloner


def test_each_runner_loads_from_the_settings_with_its_own_dtype(make_settings):
    settings = make_settings(CLIP_DTYPE="float32", IMAGE_DTYPE="bfloat16", VOICE_DTYPE="bfloat16")
    runners: list[tuple[type[ModelRunner], str, torch.dtype]] = [
        (ClipEmbedder, tiny_clip.MODEL_ID, torch.float32),
        (ImageGenerator, tiny_diffusion.MODEL_ID, torch.bfloat16),
        (VoiceCloner, tiny_voice.MODEL_ID, torch.bfloat16),
    ]
    for runner, model_id, dtype in runners:
        loaded = runner.load(settings)
        assert (loaded.model_id, loaded.device, loaded.dtype) == (model_id, torch.device("cpu"), dtype), runner


def test_a_batch_the_device_has_no_memory_for_is_embedded_in_halves(make_settings):
    """A batch the device cannot hold is embedded in halves, each halved again as needed, giving the vectors the
    whole batch would have; one image alone that does not fit is a DeviceMemoryError."""
    embedder = ClipEmbedder.load(make_settings())
    size = embedder.input_size
    inputs = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) for seed in range(7)]
    whole = embedder.embed_prepared(inputs)
    encode, tried = embedder._model.encode_image, []

    def holds_three(batch: torch.Tensor) -> torch.Tensor:
        tried.append(len(batch))
        if len(batch) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return encode(batch)

    embedder._model.encode_image = holds_three
    halved = embedder.embed_prepared(inputs)
    assert tried == [7, 3, 4, 2, 2]
    np.testing.assert_allclose(halved, whole, atol=1e-5)

    def holds_none(batch: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    embedder._model.encode_image = holds_none
    with pytest.raises(DeviceMemoryError, match="CLIP image tower ran out of memory on cpu") as raised:
        embedder.embed_prepared(inputs[:2])
    assert raised.value.code == "device_memory_unavailable"
    assert raised.value.__context__ is None  # the failed call's frames (and its tensors) are not kept alive
