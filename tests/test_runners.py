"""The one model interface (models/runner.py): each runner loads from the settings and says which model it holds,
where and in which dtype (the tiny profile's models, on the CPU)."""

from __future__ import annotations

import torch

from models.clip import ClipEmbedder
from models.diffusion import ImageGenerator
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
