"""MP3 out: mono, constant bitrate, encoded in-process by LAME (the lameenc bindings), whole or streamed.

PyAV's FFmpeg has LAME too, but its build encodes three to four times slower (2 s of 24 kHz speech at the same
algorithm quality: 15 ms there, 4.5 ms here), and encoding is most of what a voice answer costs besides the model.

A whole file (`encode_mp3`, `Mp3File`) starts with a Xing "Info" frame carrying the LAME tag: the frame and byte
counts, a seek table, and LAME's encoder delay and the last frame's padding, by which decoders trim what the
encoder added, so the file plays exactly as long as the samples. That frame can only be made once every frame is
known, so a stream (`Mp3Stream`) is bare frames and plays 48..72 ms longer than its samples.
"""

from __future__ import annotations

import io

import av
import lameenc
import numpy as np

from contract.crc16 import crc16_arc

MP3_BITRATE = 128_000
# LAME's algorithm quality (0 best and slowest .. 9): FFmpeg leaves LAME at 3; 5 encodes speech 30% faster with the
# same signal-to-noise ratio at these bitrates
LAME_QUALITY = 5
LAME_VERSION = b"LAME3.100"  # what lameenc bundles; the LAME tag names its encoder
ENCODER_DELAY = 576  # samples LAME puts before the signal (lame_get_encoder_delay), for any rate and mode

# layer III bitrates in kbps by bitrate index 1..14: MPEG-1, then MPEG-2 and 2.5
_KBPS = {
    True: (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    False: (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by the version bits
_XING_SIZE = 4 + 4 + 4 + 4 + 100 + 4  # "Info", flags, frames, bytes, seek table, quality
_LAME_TAG_SIZE = 36


class _Lame:
    """One lameenc encoder: mono float32 samples in (clipped to [-1, 1], as 16-bit PCM), MP3 frames out."""

    def __init__(self, sample_rate: int, bitrate: int) -> None:
        self._encoder = lameenc.Encoder()
        self._encoder.set_channels(1)
        self._encoder.set_in_sample_rate(sample_rate)
        self._encoder.set_out_sample_rate(sample_rate)
        self._encoder.set_bit_rate(bitrate // 1000)
        self._encoder.set_quality(LAME_QUALITY)
        self.samples = 0

    def encode(self, samples: np.ndarray) -> bytes:
        pcm = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0
        self.samples += len(pcm)
        return bytes(self._encoder.encode(np.rint(pcm).astype("<i2").tobytes()))

    def flush(self) -> bytes:
        return bytes(self._encoder.flush())


class Mp3Stream:
    """Incremental MP3 encoding for streaming: `push` samples as they come and get the MP3 frames finished so far,
    then `finish` for the rest. What push and finish return, joined in order, is the whole file: bare MP3 frames,
    nothing rewritten at the end. Without the Info frame (which can only be written last) a decoder does not know
    LAME's encoder delay and the last frame's padding, so the file plays 48..72 ms longer than the samples pushed.
    Not thread-safe: use it from one thread."""

    def __init__(self, sample_rate: int, bitrate: int = MP3_BITRATE) -> None:
        self._lame = _Lame(sample_rate, bitrate)

    def push(self, samples: np.ndarray) -> bytes:
        """Encode mono float32 samples; returns the MP3 bytes completed so far (possibly none)."""
        return self._lame.encode(samples)

    def finish(self) -> bytes:
        """Flush the encoder; returns the last MP3 bytes."""
        return self._lame.flush()


class Mp3File:
    """Incremental MP3 encoding of a whole file: `write` samples as they come, then `finish` for the file (the
    Info frame, then the frames), the same bytes encode_mp3 gives for all the samples at once. Not thread-safe:
    write from one thread at a time."""

    def __init__(self, sample_rate: int, bitrate: int = MP3_BITRATE) -> None:
        self._lame = _Lame(sample_rate, bitrate)
        self._frames = bytearray()

    def write(self, samples: np.ndarray) -> None:
        self._frames += self._lame.encode(samples)

    def finish(self) -> bytes:
        self._frames += self._lame.flush()
        audio = bytes(self._frames)
        return info_frame(audio, self._lame.samples) + audio


def encode_mp3(waveform: np.ndarray, sample_rate: int, bitrate: int = MP3_BITRATE) -> bytes:
    """Mono float32 samples -> MP3 bytes (LAME, constant bitrate), in one go: an Info frame, then the frames
    Mp3Stream gives for the same samples."""
    encoder = Mp3File(sample_rate, bitrate)
    encoder.write(waveform)
    return encoder.finish()


def mp3_seconds(data: bytes) -> float:
    """How long MP3 bytes play: their decoded samples over their sample rate (an Info frame's trimming applied)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.codec_context.sample_rate


def _frame_shape(header: int) -> tuple[int, int]:
    """(bytes, samples) of the layer III frame that starts with the 32-bit `header`."""
    version = (header >> 19) & 3
    mpeg1 = version == 3
    kbps = _KBPS[mpeg1][((header >> 12) & 15) - 1]
    rate = _RATES[version][(header >> 10) & 3]
    samples = 1152 if mpeg1 else 576
    return samples // 8 * kbps * 1000 // rate + ((header >> 9) & 1), samples


def _frame_starts(audio: bytes) -> tuple[list[int], int]:
    """Where each frame of `audio` starts, and the samples a frame holds."""
    starts: list[int] = []
    position, samples = 0, 0
    while position + 4 <= len(audio):
        size, samples = _frame_shape(int.from_bytes(audio[position : position + 4], "big"))
        starts.append(position)
        position += size
    return starts, samples


def info_frame(audio: bytes, samples: int) -> bytes:
    """The Xing "Info" frame with the LAME tag for `audio` (LAME's frames for `samples` samples): what a decoder
    needs to trim the encoder's delay and padding and to seek, and checksums of the tag and the audio."""
    starts, frame_samples = _frame_starts(audio)
    if not starts:
        return b""
    first = int.from_bytes(audio[:4], "big")
    mpeg1, mono = (first >> 19) & 3 == 3, (first >> 6) & 3 == 3
    side_info = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    needed = 4 + side_info + _XING_SIZE + _LAME_TAG_SIZE
    header = first & ~(1 << 9)  # no padding slot
    while _frame_shape(header)[0] < needed:  # a tag frame too small at the stream's bitrate takes a higher one
        header += 1 << 12
    size = _frame_shape(header)[0]
    total = size + len(audio)
    padding = len(starts) * frame_samples - samples - ENCODER_DELAY
    seek = bytes(min(255, 256 * (size + starts[len(starts) * i // 100]) // total) for i in range(100))
    tag = bytearray(_LAME_TAG_SIZE)
    tag[:9] = LAME_VERSION
    tag[9] = 1  # tag revision 0, constant bitrate
    tag[20] = min(255, _KBPS[mpeg1][((first >> 12) & 15) - 1])
    tag[21:24] = (ENCODER_DELAY << 12 | padding).to_bytes(3, "big")
    tag[28:32] = total.to_bytes(4, "big")
    tag[32:34] = crc16_arc(audio).to_bytes(2, "big")
    frame = (
        header.to_bytes(4, "big")
        + bytes(side_info)
        + b"Info"
        + (0x0F).to_bytes(4, "big")  # frames, bytes, seek table and quality present
        + len(starts).to_bytes(4, "big")
        + total.to_bytes(4, "big")
        + seek
        + bytes(4)
        + tag[:34]
    )
    frame += crc16_arc(frame).to_bytes(2, "big")
    return frame + bytes(size - len(frame))
