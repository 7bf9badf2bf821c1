"""A tiny random-weight open_clip model of the real classes, for tests and smoke runs.

It is written once as a `local-dir:` model folder (open_clip_config.json + safetensors weights) and then
loaded through the same production path as any local CLIP model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIP
from safetensors.torch import save_file

MODEL_ID = "tiny-open-clip-v1"

_CONFIG: dict[str, dict[str, Any]] = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}


def ensure(cache_dir: Path) -> Path:
    """Build the tiny model folder under cache_dir unless it is already there; returns the folder."""
    folder = cache_dir / MODEL_ID
    weights = folder / "open_clip_model.safetensors"
    if weights.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(_CONFIG, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(**_CONFIG["model_cfg"])
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    partial = weights.with_suffix(".partial")
    save_file(state, str(partial))
    partial.replace(weights)
    return folder
