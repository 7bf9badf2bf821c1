"""A tiny random-weight Qwen3-TTS Base (voice clone) model of the real classes, for tests and smoke runs.

Every part is the real class: Qwen3TTSForConditionalGeneration (talker, code predictor, ECAPA speaker encoder),
the 12 Hz speech tokenizer (Mimi encoder + Qwen3TTSTokenizerV2 decoder) with its EncodecFeatureExtractor, and a
byte-level Qwen2Tokenizer built offline (256 byte symbols, no merges, plus the chat and TTS special tokens). The
folder has the layout of a published checkpoint (config.json, model.safetensors, tokenizer files,
generation_config.json, speech_tokenizer/) and is loaded through the production loader.

The weights are written with safetensors directly: qwen_tts declares `_tied_weights_keys` as a list, which
transformers 5's save_pretrained no longer accepts (loading is unaffected).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from open_clip.tokenizer import bytes_to_unicode
from safetensors.torch import save_file
from transformers import EncodecFeatureExtractor, MimiConfig, Qwen2Tokenizer

from models.qwen_tts_import import fill_config_defaults, qwen_tts

MODEL_ID = "tiny-qwen3-tts-base-v1"

LANGUAGES = (
    "chinese",
    "english",
    "german",
    "italian",
    "portuguese",
    "spanish",
    "japanese",
    "korean",
    "french",
    "russian",
)
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tts_pad|>", "<|tts_text_bos|>", "<|tts_text_eod|>")
_CODEBOOK = 32  # speech codebook entries; the talker's codec vocabulary adds 1024 control ids after them
_QUANTIZERS = 4
_HIDDEN = 32
_MAX_NEW_TOKENS = 24  # about two seconds of 12.5 Hz frames: a random model rarely stops on its own


def _tokenizer(scratch: Path) -> tuple[Qwen2Tokenizer, dict[str, int]]:
    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    for token in _SPECIALS:
        vocab[token] = len(vocab)
    (scratch / "vocab.json").write_text(json.dumps(vocab))
    (scratch / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = Qwen2Tokenizer(
        str(scratch / "vocab.json"),
        str(scratch / "merges.txt"),
        errors="replace",
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(_SPECIALS[1:]),
    )
    return tokenizer, vocab


def _model_config(vocab: dict[str, int]) -> dict[str, Any]:
    codec = {
        name: _CODEBOOK + offset
        for name, offset in (
            ("codec_pad_id", 0),
            ("codec_bos_id", 1),
            ("codec_eos_token_id", 2),
            ("codec_think_id", 3),
            ("codec_nothink_id", 4),
            ("codec_think_bos_id", 5),
            ("codec_think_eos_id", 6),
        )
    }
    attention = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    talker = {
        "vocab_size": _CODEBOOK + 1024,
        "hidden_size": _HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        **attention,
        "max_position_embeddings": 4096,
        "num_code_groups": _QUANTIZERS,
        "text_hidden_size": _HIDDEN,
        "text_vocab_size": len(vocab) + 2,
        "rope_theta": 10000,
        "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2], "interleaved": True},
        **codec,
        "codec_language_id": {name: _CODEBOOK + 10 + index for index, name in enumerate(LANGUAGES)},
        "spk_id": {},
        "spk_is_dialect": {},
        "code_predictor_config": {
            "vocab_size": _CODEBOOK,
            "hidden_size": _HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            **attention,
            "max_position_embeddings": 64,
            "num_code_groups": _QUANTIZERS,
        },
    }
    speaker_encoder = {
        "mel_dim": 128,
        "enc_dim": _HIDDEN,
        "enc_channels": [32, 32, 32, 32, 96],
        "enc_kernel_sizes": [5, 3, 3, 3, 1],
        "enc_dilations": [1, 2, 3, 4, 1],
        "enc_attention_channels": 16,
        "enc_res2net_scale": 4,
        "enc_se_channels": 16,
        "sample_rate": 24000,
    }
    return {
        "architectures": ["Qwen3TTSForConditionalGeneration"],
        "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz",
        "tts_model_size": "0b6",
        "tts_model_type": "base",
        "im_start_token_id": vocab["<|im_start|>"],
        "im_end_token_id": vocab["<|im_end|>"],
        "tts_pad_token_id": vocab["<|tts_pad|>"],
        "tts_bos_token_id": vocab["<|tts_text_bos|>"],
        "tts_eos_token_id": vocab["<|tts_text_eod|>"],
        "talker_config": talker,
        "speaker_encoder_config": speaker_encoder,
    }


def _speech_tokenizer_config() -> dict[str, Any]:
    encoder = MimiConfig(
        sampling_rate=24000,
        frame_rate=12.5,
        hidden_size=_HIDDEN,
        num_filters=4,
        upsampling_ratios=[8, 6, 5, 4],
        codebook_size=_CODEBOOK,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=_QUANTIZERS,
        num_semantic_quantizers=1,
        upsample_groups=_HIDDEN,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
    ).to_dict()
    decoder = {
        "codebook_size": _CODEBOOK,
        "codebook_dim": 16,
        "hidden_size": _HIDDEN,
        "latent_dim": _HIDDEN,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_quantizers": _QUANTIZERS,
        "upsample_rates": [8, 5, 4, 3],
        "upsampling_ratios": [2, 2],
        "decoder_dim": _HIDDEN,
    }
    return {
        "architectures": ["Qwen3TTSTokenizerV2Model"],
        "model_type": "qwen3_tts_tokenizer_12hz",
        "encoder_config": encoder,
        "decoder_config": decoder,
        "encoder_valid_num_quantizers": _QUANTIZERS,
        "input_sample_rate": 24000,
        "output_sample_rate": 24000,
        "decode_upsample_rate": 1920,
        "encode_downsample_rate": 1920,
    }


def _save(model: torch.nn.Module, folder: Path) -> None:
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def ensure(cache_dir: Path) -> Path:
    """Build the tiny model folder under cache_dir unless it is already there; returns the folder."""
    folder = cache_dir / MODEL_ID
    if (folder / "speech_tokenizer" / "model.safetensors").is_file():
        return folder
    models = qwen_tts()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch_dir, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        scratch = Path(scratch_dir)
        staged = scratch / "model"
        (staged / "speech_tokenizer").mkdir(parents=True)
        tokenizer, vocab = _tokenizer(scratch)
        config = _model_config(vocab)
        (staged / "config.json").write_text(json.dumps(config, indent=2))
        model_config = fill_config_defaults(
            models.Qwen3TTSConfig(**{k: v for k, v in config.items() if k != "architectures"})
        )
        _save(models.Qwen3TTSForConditionalGeneration(model_config), staged)
        models.Qwen3TTSProcessor(tokenizer=tokenizer).save_pretrained(staged)
        (staged / "generation_config.json").write_text(
            json.dumps(
                {
                    "do_sample": True,
                    "top_k": 50,
                    "top_p": 1.0,
                    "temperature": 0.9,
                    "repetition_penalty": 1.05,
                    "subtalker_dosample": True,
                    "subtalker_top_k": 50,
                    "subtalker_top_p": 1.0,
                    "subtalker_temperature": 0.9,
                    "max_new_tokens": _MAX_NEW_TOKENS,
                }
            )
        )
        speech_config = _speech_tokenizer_config()
        (staged / "speech_tokenizer" / "config.json").write_text(json.dumps(speech_config, indent=2))
        speech_model = models.Qwen3TTSTokenizerV2Model(
            models.Qwen3TTSTokenizerV2Config(**{k: v for k, v in speech_config.items() if k != "architectures"})
        )
        with torch.no_grad():  # random decoder weights large enough to make audible noise, not silence
            for parameter in speech_model.decoder.parameters():
                if parameter.dim() > 1:
                    torch.nn.init.normal_(parameter, std=0.2)
        _save(speech_model, staged / "speech_tokenizer")
        EncodecFeatureExtractor(
            feature_size=1, sampling_rate=24000, padding_value=0.0, return_attention_mask=True
        ).save_pretrained(staged / "speech_tokenizer")
        shutil.rmtree(folder, ignore_errors=True)
        staged.rename(folder)
    return folder
