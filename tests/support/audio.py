"""Reference clips for voice tests: speech from Debian's espeak-ng, tones from sox, transcoded with PyAV."""

from __future__ import annotations

import functools
import io
import subprocess
import tempfile
from pathlib import Path

import av

# format name -> (PyAV container format, encoder, sample rate), for the formats PyAV's bundled FFmpeg writes
_PYAV_FORMATS = {
    "mp3": ("mp3", "libmp3lame", 22050),
    "flac": ("flac", "flac", 22050),
    "ogg-opus": ("ogg", "libopus", 48000),
    "m4a": ("ipod", "aac", 22050),
    "aac": ("adts", "aac", 22050),
}
CLIP_FORMATS = ("wav", *_PYAV_FORMATS, "ogg-vorbis")


@functools.cache
def speech_wav(text: str = "Hello there. This is the reference voice, speaking clearly for a few seconds.") -> bytes:
    """A WAV clip of espeak-ng saying `text` (mono, 22.05 kHz)."""
    return subprocess.run(["espeak-ng", "--stdout", "-s", "150", text], check=True, capture_output=True).stdout


def tone_wav(seconds: float, rate: int = 16000) -> bytes:
    """A sine tone of the given length, made by sox."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "tone.wav"
        subprocess.run(
            ["sox", "-n", "-r", str(rate), "-c", "1", str(path), "synth", f"{seconds}", "sine", "440"], check=True
        )
        return path.read_bytes()


def _sox_convert(wav: bytes, suffix: str) -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        source, target = Path(scratch) / "in.wav", Path(scratch) / f"out.{suffix}"
        source.write_bytes(wav)
        subprocess.run(["sox", str(source), str(target)], check=True)
        return target.read_bytes()


def pyav_convert(wav: bytes, container: str, codec: str, rate: int, layout: str = "mono") -> bytes:
    """`wav` encoded by PyAV's FFmpeg with `codec` in `container`, at `rate` with this channel layout."""
    output_buffer = io.BytesIO()
    with av.open(io.BytesIO(wav)) as source, av.open(output_buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.layout = layout
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate)
        decoded = [part for frame in source.decode(audio=0) for part in resampler.resample(frame)]
        for frame in [*decoded, *resampler.resample(None)]:
            frame.pts = None
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return output_buffer.getvalue()


@functools.cache
def speech_clip(fmt: str) -> bytes:
    """The espeak-ng speech clip in one of CLIP_FORMATS."""
    wav = speech_wav()
    if fmt == "wav":
        return wav
    if fmt == "ogg-vorbis":
        return _sox_convert(wav, "ogg")
    return pyav_convert(wav, *_PYAV_FORMATS[fmt])


def mp3_info(data: bytes) -> tuple[float, int]:
    """(duration in seconds from the decoded samples, sample rate) of MP3 bytes; fails if they are not MP3."""
    with av.open(io.BytesIO(data)) as container:
        assert container.format.name == "mp3", container.format.name
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        samples = sum(frame.samples for frame in container.decode(stream))
    return samples / rate, rate
