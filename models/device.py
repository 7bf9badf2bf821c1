"""Device and dtype choice shared by the model runners."""

from __future__ import annotations

import torch


def pick_device(requested: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else is passed to torch as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
