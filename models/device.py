"""Device and dtype choice shared by the model runners."""

from __future__ import annotations

import torch

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
