"""A tiny random-weight Stable Diffusion pipeline of the real diffusers classes, for tests and smoke runs.

UNet2DConditionModel, AutoencoderKL, a 2-layer CLIPTextModel, DDIMScheduler and a CLIPTokenizer whose vocabulary
is built offline from the byte-level BPE file that ships inside open_clip. It is saved with save_pretrained and
loaded back through the production loader (DiffusionPipeline.from_pretrained).
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from open_clip.tokenizer import bytes_to_unicode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

MODEL_ID = "tiny-stable-diffusion-v2"
_MERGES = 48894  # merges used by CLIP's 49408-token vocabulary


def _write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe) as fh:
        merges = fh.read().decode("utf-8").split("\n")[1 : _MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [f"{symbol}</w>" for symbol in symbols]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def ensure(cache_dir: Path) -> Path:
    """Build the tiny pipeline folder under cache_dir unless it is already there; returns the folder."""
    folder = cache_dir / MODEL_ID
    if (folder / "model_index.json").is_file():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vocab_file, merges_file = _write_clip_tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=32,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=32,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
        )
        scheduler = DDIMScheduler(
            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        )
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        staged = Path(scratch) / "pipeline"
        pipeline.save_pretrained(staged)
        shutil.rmtree(folder, ignore_errors=True)
        staged.rename(folder)
    return folder
