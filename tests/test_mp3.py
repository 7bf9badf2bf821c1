"""MP3 out (contract/mp3.py): the Info frame by which decoders trim LAME's delay and padding, and its checksums."""

from __future__ import annotations

import io
import os

import av
import numpy as np
import pytest

from contract.crc16 import crc16_arc
from contract.mp3 import ENCODER_DELAY, LAME_VERSION, encode_mp3

RATE = 24000


def bitwise_crc16_arc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def test_crc16_is_crc16_arc():
    assert crc16_arc(b"123456789") == 0xBB3D  # the catalogued check value
    for size in [*range(0, 200), 4095, 4096, 4097, 33_024, 100_001]:
        data = os.urandom(size)
        assert crc16_arc(data) == bitwise_crc16_arc(data), size


def tone(samples: int) -> np.ndarray:
    rng = np.random.default_rng(samples)
    signal = 0.3 * np.sin(np.arange(samples) * 2 * np.pi * 220 / RATE) + 0.02 * rng.standard_normal(samples)
    return signal.astype(np.float32)


def decoded(mp3: bytes) -> tuple[int, int]:
    """(samples FFmpeg decodes, audio packets it reads: the Info frame is not one)."""
    with av.open(io.BytesIO(mp3)) as container:
        stream = container.streams.audio[0]
        packets = [packet for packet in container.demux(stream) if packet.size]
        samples = sum(frame.samples for packet in packets for frame in packet.decode())
    return samples, len(packets)


@pytest.mark.parametrize("kbps", [64, 160])
@pytest.mark.parametrize("samples", [100, 1_199, RATE, 7 * RATE + 13])
def test_a_whole_file_plays_exactly_as_long_as_its_samples(samples, kbps):
    assert decoded(encode_mp3(tone(samples), RATE, kbps * 1000))[0] == samples


@pytest.mark.parametrize("kbps", [64, 96, 128, 160])
def test_the_bitrate_is_the_one_asked_for(kbps):
    seconds = 4
    mp3 = encode_mp3(np.zeros(RATE * seconds, dtype=np.float32), RATE, kbps * 1000)
    assert len(mp3) * 8 / seconds == pytest.approx(kbps * 1000, rel=0.05)


def test_the_lame_tag_adds_up():
    samples = 2 * RATE + 100
    mp3 = encode_mp3(tone(samples), RATE, 128_000)
    size = 384  # an MPEG-2 layer III frame at 128 kbps and 24 kHz, no padding slot
    frame, audio = mp3[:size], mp3[size:]
    assert frame[:2] == b"\xff\xf3" and audio[:2] == b"\xff\xf3"
    xing = 4 + 9  # after the header and a mono MPEG-2 frame's side information
    assert frame[xing : xing + 4] == b"Info"
    frames = int.from_bytes(frame[xing + 8 : xing + 12], "big")
    assert frames == decoded(mp3)[1] == len(audio) // size
    assert int.from_bytes(frame[xing + 12 : xing + 16], "big") == len(mp3)
    seek = frame[xing + 16 : xing + 116]
    # where 0%..99% of the playing time starts, in 256ths of the file (the first audio frame follows this one)
    assert seek[0] == 256 * size // len(mp3) and list(seek) == sorted(seek) and seek[99] < 256
    tag = frame[xing + 120 : xing + 156]
    assert tag[:9] == LAME_VERSION
    delays = int.from_bytes(tag[21:24], "big")
    assert delays >> 12 == ENCODER_DELAY
    assert delays & 0xFFF == frames * 576 - samples - ENCODER_DELAY
    assert int.from_bytes(tag[28:32], "big") == len(mp3)
    assert int.from_bytes(tag[32:34], "big") == bitwise_crc16_arc(audio)
    assert int.from_bytes(tag[34:36], "big") == bitwise_crc16_arc(frame[: xing + 154])
    assert not any(frame[xing + 156 :])
