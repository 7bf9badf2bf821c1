"""Decoding reference clips and splitting long text for speech: the pieces under the voice job."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from contract import audio
from contract.audio import InvalidAudioError, check_audio, decode_audio
from processor.text_chunks import split_text
from tests.support.audio import CLIP_FORMATS, pyav_convert, speech_clip, speech_wav, tone_wav
from tests.support.images import encoded

RATE = 24000
ROOT = Path(__file__).resolve().parent.parent


def wav_seconds(data: bytes) -> float:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)) / stream.codec_context.sample_rate


@pytest.mark.parametrize("fmt", CLIP_FORMATS)
def test_each_format_decodes_to_mono_at_the_requested_rate(fmt):
    decoded = decode_audio(speech_clip(fmt), sample_rate=RATE, min_seconds=1.0, max_seconds=30.0)
    assert decoded.sample_rate == RATE
    assert decoded.waveform.ndim == 1
    assert decoded.waveform.dtype == np.float32
    # lossy codecs pad a little at either end; the speech itself is all there
    assert decoded.seconds == pytest.approx(wav_seconds(speech_wav()), abs=0.1)
    assert float(np.abs(decoded.waveform).max()) > 0.05
    expected = {"ogg-opus": "ogg", "ogg-vorbis": "ogg"}.get(fmt, fmt)
    assert decoded.source_format == expected


def test_stereo_is_mixed_down():
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="wav") as output:
        stream = output.add_stream("pcm_s16le", rate=16000)
        stream.layout = "stereo"
        left = (np.sin(np.linspace(0, 2000, 32000)) * 12000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.stack([left, left]).T.reshape(1, -1), format="s16", layout="stereo")
        frame.rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            output.mux(packet)
    decoded = decode_audio(buffer.getvalue(), sample_rate=RATE, min_seconds=1.0, max_seconds=30.0)
    assert decoded.waveform.ndim == 1
    assert decoded.seconds == pytest.approx(2.0, abs=0.01)


def test_a_stream_that_changes_its_layout_midway_decodes_whole():
    """Two AAC streams back to back, stereo then mono: the decoder's frames change layout halfway, which PyAV's
    resampler refused with a ValueError (a 500 in the API, found by fuzzing); each part is now mixed down."""
    stereo, mono = (pyav_convert(speech_wav(), "adts", "aac", 22050, layout) for layout in ("stereo", "mono"))
    alone = decode_audio(stereo, sample_rate=RATE, min_seconds=1.0, max_seconds=30.0).seconds
    joined = decode_audio(stereo + mono, sample_rate=RATE, min_seconds=1.0, max_seconds=30.0)
    assert joined.seconds == pytest.approx(2 * alone, abs=0.1)
    assert check_audio(stereo + mono, min_seconds=1.0, max_seconds=30.0) == "aac"


def wav_header(channels: int, bytes_per_sample: int, rate: int, frames: int) -> bytes:
    """A PCM WAV as its header says, whatever that says (the wave module refuses nonsense)."""
    data = bytes(channels * bytes_per_sample * frames)
    block = channels * bytes_per_sample
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bytes_per_sample * 8)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"%PDF-1.7 not audio at all" * 20, "not_audio"),
        (None, "audio_too_short"),
        (wav_header(1, 0, 24000, 48000), "corrupt_audio"),  # 0 bits a sample: FFmpeg has no decoder for it
        (wav_header(0, 2, 24000, 48000), "corrupt_audio"),  # no channels
        # a chunk larger than the RIFF that holds it: the wave module raised RuntimeError (a 500, found by fuzzing)
        (b"RIFF" + struct.pack("<I", 20) + b"WAVEJUNK" + struct.pack("<I", 1000) + bytes(8), "not_audio"),
    ],
    ids=["empty", "pdf", "short", "zero-bit-wav", "no-channel-wav", "chunk-past-riff"],
)
def test_bad_clips_name_the_problem(data, code):
    """The same verdict from the processor's decode and the API's check."""
    clip = tone_wav(0.3) if data is None else data
    with pytest.raises(InvalidAudioError) as caught:
        decode_audio(clip, sample_rate=RATE, min_seconds=1.0, max_seconds=30.0)
    assert caught.value.code == code
    with pytest.raises(InvalidAudioError) as checked:
        check_audio(clip, min_seconds=1.0, max_seconds=30.0)
    assert (checked.value.code, checked.value.message) == (code, caught.value.message)


@pytest.mark.parametrize("fmt", CLIP_FORMATS)
def test_the_apis_check_takes_what_the_decode_takes_without_resampling(fmt, monkeypatch):
    clip = speech_clip(fmt)
    decode_audio(clip, sample_rate=RATE, min_seconds=1.0, max_seconds=30.0)
    monkeypatch.setattr(audio, "resample", lambda *args: pytest.fail("resampled"))
    assert check_audio(clip, min_seconds=1.0, max_seconds=30.0) == fmt.split("-")[0]  # ogg-opus, ogg-vorbis: ogg
    assert check_audio(tone_wav(2, rate=44100), min_seconds=1.0, max_seconds=30.0) == "wav"
    with pytest.raises(InvalidAudioError) as refused:
        check_audio(clip, min_seconds=1.0, max_seconds=1.0)
    assert refused.value.code == "audio_too_long"


def test_a_long_clip_is_refused_with_the_limit_named():
    with pytest.raises(InvalidAudioError) as caught:
        decode_audio(tone_wav(5), sample_rate=RATE, min_seconds=1.0, max_seconds=4.0)
    assert caught.value.code == "audio_too_long"
    assert "VOICE_MAX_REF_SECONDS" in caught.value.message


def silent_video() -> bytes:
    """An MP4 with a video stream and no audio one."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize(
    "make",
    [lambda: encoded(1, "PNG"), lambda: encoded(1, "JPEG"), lambda: encoded(1, "GIF"), silent_video],
    ids=["png", "jpeg", "gif", "video-only-mp4"],
)
def test_an_image_or_a_video_without_sound_is_not_audio(make):
    """FFmpeg opens them (as an image sequence, a movie): what is wrong is that there is no sound, not its format."""
    clip = make()
    with pytest.raises(InvalidAudioError) as caught:
        decode_audio(clip, sample_rate=RATE, min_seconds=1.0, max_seconds=30.0)
    assert caught.value.code == "not_audio"
    assert caught.value.message.startswith("the file is not audio: it has no sound in it")
    with pytest.raises(InvalidAudioError) as checked:
        check_audio(clip, min_seconds=1.0, max_seconds=30.0)
    assert (checked.value.code, checked.value.message) == (caught.value.code, caught.value.message)


ODD_RATES = textwrap.dedent(
    """
    import io, resource, sys, wave
    import numpy as np
    from contract.audio import decode_audio
    with open("/proc/self/statm") as statm:  # the address space mapped so far, in pages; 1 GB more for the decodes
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (1 << 30), mapped + (1 << 30)))
    for rate in (44101, 96001, 23999, 8000, 384000):
        for width in (2, 1):  # 16-bit: read directly; 8-bit: through FFmpeg
            clip = io.BytesIO()
            with wave.open(clip, "wb") as out:
                out.setnchannels(1), out.setsampwidth(width), out.setframerate(rate)
                tone = np.sin(np.arange(2 * rate) * 0.05)
                pcm = (tone * 8000).astype("<i2") if width == 2 else (tone * 100 + 128).astype(np.uint8)
                out.writeframes(pcm.tobytes())
            decoded = decode_audio(clip.getvalue(), sample_rate=24000, min_seconds=1.0, max_seconds=30.0)
            sys.stdout.write(f"{rate} {width} {decoded.source_format} {round(decoded.seconds, 2)}\\n")
    """
)


def test_clips_at_any_sample_rate_are_resampled_in_bounded_memory():
    """A clip's sample rate is whatever its header says. torchaudio's resampler built a kernel as large as the two
    rates' reduced ratio (44,101 Hz to 24 kHz: 4 GB); FFmpeg's costs the same for any rate. In a process allowed
    1 GB of address space more than its imports took, each of these clips is 2 s long at 24 kHz."""
    done = subprocess.run(
        [sys.executable, "-c", ODD_RATES], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")[:-1]
    rates = (44101, 96001, 23999, 8000, 384000)
    assert lines == [f"{rate} {width} wav 2.0" for rate in rates for width in (2, 1)]


@pytest.mark.parametrize("rate", [7, 7999, 384001, 10**9])
@pytest.mark.parametrize("width", [2, 1])  # 16-bit: read directly; 8-bit: through FFmpeg
def test_a_sample_rate_no_speech_has_is_refused_with_the_range_named(rate, width):
    clip = io.BytesIO()
    with wave.open(clip, "wb") as out:
        out.setnchannels(1), out.setsampwidth(width), out.setframerate(rate)
        out.writeframes(bytes(width * 16000))
    with pytest.raises(InvalidAudioError) as refused:
        check_audio(clip.getvalue(), min_seconds=0.0, max_seconds=10**9)
    assert refused.value.code == "unsupported_sample_rate"
    assert "8000..384000 Hz" in refused.value.message


def test_short_text_is_one_piece():
    assert split_text("  Hello there.  ", 250) == ["Hello there."]


def test_pieces_end_at_sentences_and_keep_every_word_in_order():
    text = " ".join(f"Sentence number {n} says something of moderate length." for n in range(20))
    pieces = split_text(text, 120)
    assert all(len(piece) <= 120 for piece in pieces)
    assert all(piece.endswith(".") for piece in pieces)
    assert " ".join(pieces).split() == text.split()


def test_cjk_punctuation_and_newlines_are_sentence_ends():
    text = "오전 10시 30분에 미팅이 있어요. 확인해 주시겠어요?\n今天天气很好。我们去公园吧！"
    pieces = split_text(text, 20)
    # sentences are packed into pieces up to the limit; a piece never ends inside a sentence
    assert pieces == ["오전 10시 30분에 미팅이 있어요.", "확인해 주시겠어요? 今天天气很好。", "我们去公园吧！"]


def test_a_sentence_longer_than_the_limit_is_cut_at_clauses_then_words_then_anywhere():
    clauses = "first part here, second part here, third part here, fourth part here."
    assert split_text(clauses, 40) == ["first part here, second part here,", "third part here, fourth part here."]
    words = "word " * 30
    assert all(len(piece) <= 22 for piece in split_text(words, 22))
    assert split_text("x" * 50, 20) == ["x" * 20, "x" * 20, "x" * 10]


def _id3_tag(size: int) -> bytes:
    """An ID3v2.4 tag of `size` bytes of padding (where players keep cover art), as tagged MP3s begin."""
    syncsafe = bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    return b"ID3\x04\x00\x00" + syncsafe + bytes(size)


def test_a_clip_whose_headers_outgrow_the_quick_probe_still_decodes():
    """Clips are opened with a short probe first; a large ID3 tag in front of an MP3 (cover art) and a WAV with a
    large metadata chunk before its samples are still read in full."""
    tagged = _id3_tag(300_000) + speech_clip("mp3")
    decoded = decode_audio(tagged, sample_rate=RATE, min_seconds=1.0, max_seconds=30.0)
    assert decoded.source_format == "mp3"
    assert decoded.seconds == pytest.approx(wav_seconds(speech_wav()), abs=0.1)
    wav = speech_wav()
    junk = b"JUNK" + (200_000).to_bytes(4, "little") + bytes(200_000)
    riff = wav[:12] + junk + wav[12:]
    riff = riff[:4] + (len(riff) - 8).to_bytes(4, "little") + riff[8:]
    decoded = decode_audio(riff, sample_rate=RATE, min_seconds=1.0, max_seconds=30.0)
    assert decoded.seconds == pytest.approx(wav_seconds(wav), abs=0.05)


def test_a_mono_16_bit_wav_read_directly_gives_what_ffmpeg_gives():
    """Mono 16-bit WAVs skip FFmpeg; the samples are the same as FFmpeg's decode of the same audio in FLAC."""
    direct = decode_audio(speech_wav(), sample_rate=RATE, min_seconds=1.0, max_seconds=30.0)
    through_ffmpeg = decode_audio(speech_clip("flac"), sample_rate=RATE, min_seconds=1.0, max_seconds=30.0)
    assert direct.source_format == "wav"
    np.testing.assert_array_equal(direct.waveform, through_ffmpeg.waveform)
    with pytest.raises(InvalidAudioError) as refused:
        decode_audio(speech_wav(), sample_rate=RATE, min_seconds=1.0, max_seconds=1.0)
    assert refused.value.code == "audio_too_long"
