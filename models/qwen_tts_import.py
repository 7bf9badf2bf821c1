"""Importing qwen_tts quietly, and two repairs its classes need on transformers 5.

The package prints a flash-attn notice to stdout when imported, which would break one-JSON-object-per-line logs;
the notice goes to the debug log instead."""

from __future__ import annotations

import contextlib
import functools
import io
from types import SimpleNamespace

import structlog
import torch

log = structlog.get_logger(__name__)


@functools.cache
def qwen_tts() -> SimpleNamespace:
    """The qwen_tts classes this server uses, imported once."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        from qwen_tts import Qwen3TTSModel
        from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration, Qwen3TTSProcessor
        from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config
        from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model
    notice = " ".join(line.strip("* ") for line in captured.getvalue().splitlines() if line.strip("* "))
    if notice:
        log.debug("qwen_tts_import_notice", notice=notice)
    return SimpleNamespace(
        Qwen3TTSModel=Qwen3TTSModel,
        Qwen3TTSConfig=Qwen3TTSConfig,
        Qwen3TTSForConditionalGeneration=Qwen3TTSForConditionalGeneration,
        Qwen3TTSProcessor=Qwen3TTSProcessor,
        Qwen3TTSTokenizerV2Config=Qwen3TTSTokenizerV2Config,
        Qwen3TTSTokenizerV2Model=Qwen3TTSTokenizerV2Model,
    )


def fill_config_defaults(config: object) -> object:
    """Give the code predictor's config the `pad_token_id` qwen_tts reads but transformers 5 no longer defaults
    (published configs do not set it). Returns the same config."""
    predictor = config.talker_config.code_predictor_config  # type: ignore[attr-defined]
    if "pad_token_id" not in predictor.__dict__:
        predictor.pad_token_id = None
    return config


def restore_rotary_frequencies(*roots: torch.nn.Module) -> int:
    """Recompute the rotary embeddings' `inv_freq` in every qwen_tts module under `roots`; returns how many.

    `inv_freq` is a non-persistent buffer (not in the checkpoint). transformers 5 builds the model on the meta
    device and materialises such buffers uninitialised, and qwen_tts's rotary classes are not among those it
    re-initialises, so they hold whatever memory they got (qwen-tts-compat repairs only all-zero buffers). With
    garbage frequencies the talker loses all positional information, or produces inf/nan logits outright."""
    restored = 0
    for root in roots:
        for module in root.modules():
            rope_init = getattr(module, "rope_init_fn", None)
            current = getattr(module, "inv_freq", None)
            if rope_init is None or not isinstance(current, torch.Tensor):
                continue
            inv_freq, scaling = rope_init(module.config, current.device)
            module.inv_freq = inv_freq.to(device=current.device)
            module.original_inv_freq = module.inv_freq
            module.attention_scaling = scaling
            restored += 1
    return restored
