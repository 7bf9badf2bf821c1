"""Reference clips in, without a system FFmpeg: PyAV (its wheels bundle FFmpeg) to decode and to resample.

Clips may be MP3, WAV, FLAC, OGG (Vorbis or Opus) or M4A/AAC, at any sample rate; they are decoded to float32, mixed
down to mono and resampled. MP3 out is contract/mp3.py.
"""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

# container format names as FFmpeg reports them -> the name we use
CONTAINERS = {
    "mp3": "mp3",
    "wav": "wav",
    "flac": "flac",
    "ogg": "ogg",
    "mov,mp4,m4a,3gp,3g2,mj2": "m4a",
    "aac": "aac",
}
ACCEPTED = "MP3, WAV, FLAC, OGG/Opus, M4A/AAC"
SAMPLE_RATE = 24000  # voice references are resampled to this rate, and speech comes out at it (Qwen3-TTS's rate)
_QUICK_PROBE = {"probesize": "4096", "analyzeduration": "0"}
# sample rates a clip may have: telephone speech is 8 kHz, studio audio at most 384 kHz; a header outside these
# is not speech (or not honest)
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 384000


class InvalidAudioError(ValueError):
    """The clip is not audio we accept; `code` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class DecodedAudio:
    waveform: np.ndarray  # float32, mono, at `sample_rate`
    sample_rate: int
    source_format: str

    @property
    def seconds(self) -> float:
        return len(self.waveform) / self.sample_rate


def decode_audio(data: bytes, *, sample_rate: int, min_seconds: float, max_seconds: float) -> DecodedAudio:
    """Decode a clip to mono float32 at `sample_rate`, or raise InvalidAudioError saying what is wrong.

    Decoding stops as soon as the clip is known to be longer than `max_seconds`."""
    waveform, native_rate, fmt = _decoded(data, min_seconds, max_seconds)
    if native_rate != sample_rate:
        waveform = resample(waveform, native_rate, sample_rate)
    return DecodedAudio(
        waveform=np.ascontiguousarray(waveform, dtype=np.float32), sample_rate=sample_rate, source_format=fmt
    )


def resample(waveform: np.ndarray, native_rate: int, rate: int) -> np.ndarray:
    """Mono float32 samples at `native_rate` -> at `rate`, by FFmpeg's resampler (swresample), which costs the same
    for any pair of rates. (torchaudio's sinc resampler builds a kernel that grows with the rates' reduced ratio: a
    clip at 44,101 Hz asked it for a 4 GB kernel, at 96,001 Hz for 9 GB.)"""
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(waveform, dtype=np.float32)[None, :], format="flt", layout="mono"
    )
    frame.sample_rate = native_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    parts = [out.to_ndarray()[0] for out in [*resampler.resample(frame), *resampler.resample(None)]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def check_audio(data: bytes, *, min_seconds: float, max_seconds: float) -> str:
    """What decode_audio would say of a clip, without resampling it (the API's check before a job is queued: the
    processor decodes it again for the model; resampling 10 s of 44.1 kHz audio costs 3-4 ms). Returns the
    clip's format."""
    return _decoded(data, min_seconds, max_seconds)[2]


def _decoded(data: bytes, min_seconds: float, max_seconds: float) -> tuple[np.ndarray, int, str]:
    """The clip as mono float32 samples at its own rate, that rate and its format; InvalidAudioError if it is not
    audio we accept or its length is out of bounds."""
    if not data:
        raise InvalidAudioError("empty_file", "the audio file is empty")
    wav = _mono_pcm16_wav(data)
    if wav is not None:
        native_rate, waveform = wav
        _check_rate(native_rate)
        if len(waveform) > max_seconds * native_rate:
            raise _too_long(max_seconds)
        return _long_enough(waveform, native_rate, min_seconds), native_rate, "wav"
    container = _open(data)
    with container:
        fmt = CONTAINERS.get(container.format.name)
        if not container.streams.audio:  # an image, or a video without sound: FFmpeg opens it, but there is no audio
            raise InvalidAudioError(
                "not_audio",
                f"the file is not audio: it has no sound in it (FFmpeg reads it as {_format_name(container)}); send "
                f"a clip in {ACCEPTED}",
            )
        if fmt is None:
            raise InvalidAudioError(
                "unsupported_audio_format",
                f"audio format {_format_name(container)} is not accepted; use {ACCEPTED}",
            )
        stream = container.streams.audio[0]
        if stream.codec_context is None:  # FFmpeg has no decoder for what the header describes
            raise InvalidAudioError("corrupt_audio", f"the {fmt} clip's audio stream cannot be decoded")
        native_rate = stream.codec_context.sample_rate or stream.rate
        if not native_rate:
            raise InvalidAudioError("corrupt_audio", "the audio stream has no sample rate")
        _check_rate(native_rate)
        chunks: list[np.ndarray] = []
        samples, limit = 0, int(max_seconds * native_rate)
        try:
            for chunk in _mono(container.decode(stream), native_rate):
                chunks.append(chunk)
                samples += len(chunk)
                if samples > limit:
                    raise _too_long(max_seconds)
        except av.error.FFmpegError as exc:
            raise InvalidAudioError("corrupt_audio", f"the audio could not be decoded: {exc}") from None
    waveform = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, dtype=np.float32)
    return _long_enough(waveform, native_rate, min_seconds), native_rate, fmt


def _format_name(container: av.container.InputContainer) -> str:
    return repr(container.format.long_name or container.format.name)


def _mono(frames: Iterator[av.AudioFrame], rate: int) -> Iterator[np.ndarray]:
    """Decoded frames as mono float32 samples at `rate`. A stream may change its layout, sample format or rate
    midway (concatenated AAC, a broadcast recording): PyAV's resampler takes only frames like its first, so a
    change flushes it and starts another."""
    resampler: av.AudioResampler | None = None
    source: tuple[str, str, int] | None = None
    for frame in frames:
        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
        if resampler is None or shape != source:
            if resampler is not None:
                yield from (mono.to_ndarray()[0] for mono in resampler.resample(None))
            resampler, source = av.AudioResampler(format="fltp", layout="mono", rate=rate), shape
        yield from (mono.to_ndarray()[0] for mono in resampler.resample(frame))
    if resampler is not None:
        yield from (mono.to_ndarray()[0] for mono in resampler.resample(None))


def _check_rate(rate: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidAudioError(
            "unsupported_sample_rate",
            f"the clip's sample rate is {rate} Hz; accepted are {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz",
        )


def _too_long(max_seconds: float) -> InvalidAudioError:
    return InvalidAudioError("audio_too_long", f"the clip is longer than {max_seconds:g} s (VOICE_MAX_REF_SECONDS)")


def _long_enough(waveform: np.ndarray, native_rate: int, min_seconds: float) -> np.ndarray:
    seconds = len(waveform) / native_rate
    if seconds < min_seconds:
        raise InvalidAudioError(
            "audio_too_short", f"the clip is {seconds:.2f} s long; at least {min_seconds:g} s of speech is needed"
        )
    return waveform


def _mono_pcm16_wav(data: bytes) -> tuple[int, np.ndarray] | None:
    """(rate, samples) of a mono 16-bit PCM WAV, read directly: what browsers record and most tools write, and
    FFmpeg's frame-by-frame decode costs milliseconds more. None for anything else (FFmpeg decodes it)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    try:
        with wave.open(io.BytesIO(data), "rb") as clip:
            if clip.getnchannels() != 1 or clip.getsampwidth() != 2 or not clip.getframerate():
                return None
            pcm = clip.readframes(clip.getnframes())
            rate = clip.getframerate()
    except (wave.Error, EOFError, ValueError, RuntimeError):  # RuntimeError: a chunk larger than what holds it
        return None
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")
    return rate, samples.astype(np.float32) / 32768.0


def _open(data: bytes) -> av.container.InputContainer:
    """Open a clip for decoding. FFmpeg's default probing reads and analyses the stream at length (11 ms for a
    2 s WAV); the headers say all we need for the formats we accept, so a short probe comes first, and the full
    one only when the short one leaves the format or the sample rate unknown."""
    quick = _open_quickly(data)
    if quick is not None:
        return quick
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError):
        raise InvalidAudioError("not_audio", f"the file is not audio in a known format ({ACCEPTED})") from None


def _open_quickly(data: bytes) -> av.container.InputContainer | None:
    """The clip opened with the short probe, if that finds an audio stream with its sample rate; else None."""
    try:
        container = av.open(io.BytesIO(data), mode="r", options=_QUICK_PROBE)
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError):
        return None
    audio = container.streams.audio
    if audio and audio[0].codec_context is not None and (audio[0].codec_context.sample_rate or audio[0].rate):
        return container
    container.close()
    return None
