"""The voice-clone runner: Qwen3-TTS Base through qwen_tts (the transformers-5 build, qwen-tts-compat)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import structlog
import torch

from contract.audio import SAMPLE_RATE, DecodedAudio
from infra.settings import Settings
from models.errors import ModelLoadError
from models.hub import route_library_output
from models.qwen_tts_import import fill_config_defaults, qwen_tts, restore_rotary_frequencies
from models.runner import ModelSource, Placement, on_device

log = structlog.get_logger(__name__)

_GAP_SECONDS = 0.2  # silence between synthesized pieces of a long text
_BATCH = 4  # pieces of a long text synthesized in one call


class VoiceCloner:
    """Loaded once; `clone` runs in a worker thread and holds a lock, so inference is one at a time."""

    def __init__(self, model: Any, model_id: str, placement: Placement) -> None:
        self._model = model
        self._lock = threading.Lock()
        self.model_id = model_id
        self.device, self.dtype = placement.device, placement.dtype

    @classmethod
    def load(cls, settings: Settings) -> VoiceCloner:
        placement = Placement.choose(settings.torch_device, settings.voice_dtype)
        route_library_output("transformers")  # before the tiny build too: saving a model draws a bar
        source = ModelSource.pick(
            settings,
            configured=settings.voice_model,
            setting="VOICE_MODEL (a local folder)",
            tiny="voice",
        )
        models = qwen_tts()

        def build() -> Any:
            config = fill_config_defaults(models.Qwen3TTSConfig.from_pretrained(source.location))
            return models.Qwen3TTSModel.from_pretrained(
                source.location, config=config, dtype=placement.dtype, device_map=str(placement.device)
            )

        model = source.load("voice model", build)
        restore_rotary_frequencies(model.model, model.model.speech_tokenizer.model)
        if model.model.tts_model_type != "base":
            raise ModelLoadError(
                f"voice model {source.model_id!r} is a {model.model.tts_model_type!r} model; voice cloning needs a "
                "Base model (VOICE_MODEL=Qwen/Qwen3-TTS-12Hz-0.6B-Base or -1.7B-Base)"
            )
        log.info("voice_model_loaded", model=source.model_id, **placement.describe())
        return cls(model, source.model_id, placement)

    def clone(
        self,
        *,
        reference: DecodedAudio,
        ref_text: str,
        pieces: Sequence[str],
        language: str,
        on_piece: Callable[[np.ndarray], None] | None = None,
        one_by_one: bool = False,
    ) -> np.ndarray:
        """Speak each piece of text in the reference voice and join them; mono float32 at SAMPLE_RATE.

        The pieces are spoken a few per model call, or one per call with `one_by_one` (the first is heard sooner).
        With `on_piece`, each is handed to on_piece (in this thread) as soon as its call returns, with the 0.2 s
        pause before it (all but the first): what on_piece gets, joined, is the returned waveform.
        DeviceMemoryError when the device has no memory for a call (pieces handed over before it stand)."""
        if reference.sample_rate != SAMPLE_RATE:
            raise ValueError(f"the reference must be resampled to {SAMPLE_RATE} Hz first")
        batch = 1 if one_by_one else _BATCH
        joined = on_device(
            "the voice model", self.device, lambda: self._clone(reference, ref_text, pieces, language, batch, on_piece)
        )
        return np.concatenate(joined) if joined else np.zeros(0, dtype=np.float32)

    def _clone(
        self,
        reference: DecodedAudio,
        ref_text: str,
        pieces: Sequence[str],
        language: str,
        batch: int,
        on_piece: Callable[[np.ndarray], None] | None,
    ) -> list[np.ndarray]:
        """The spoken pieces, `batch` per model call, each but the first with the pause before it."""
        gap = np.zeros(int(_GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
        joined: list[np.ndarray] = []
        with self._lock, torch.inference_mode(), warnings.catch_warnings():
            # qwen_tts generates from embeddings; transformers notes that the penalty then covers new tokens only
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty`", category=UserWarning)
            prompt = self._model.create_voice_clone_prompt(
                ref_audio=(reference.waveform, SAMPLE_RATE), ref_text=ref_text
            )
            for start in range(0, len(pieces), batch):
                for wave in self._speak(prompt, pieces[start : start + batch], language):
                    part = np.concatenate([gap, wave]) if joined else wave
                    joined.append(part)
                    if on_piece is not None:
                        on_piece(part)
        return joined

    def _speak(self, prompt: Any, texts: Sequence[str], language: str) -> list[np.ndarray]:
        """One model call: the texts spoken in the prompt's voice, one waveform each."""
        waves, rate = self._model.generate_voice_clone(
            text=list(texts), language=[language] * len(texts), voice_clone_prompt=prompt * len(texts)
        )
        if rate != SAMPLE_RATE:
            raise RuntimeError(f"the voice model produced {rate} Hz audio, expected {SAMPLE_RATE}")
        return [np.asarray(wave, dtype=np.float32) for wave in waves]
