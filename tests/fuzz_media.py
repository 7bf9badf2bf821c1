"""Mutation fuzzing of the decoders that read what clients and upstream systems send: reference clips
(contract/audio.py) and images (contract/imaging.py). Valid files of every accepted format get random bytes
changed, cut, or inserted; each mutant goes through the API's check and the processor's decode, which must either
accept it or raise the decoder's own error (InvalidAudioError, InvalidImageError: a 4xx). Anything else would be a
500 or a dead letter marked internal_error. Exits 1 and names each such exception, with the traceback's end and
the mutant saved under --keep.

    .venv/bin/python -m tests.fuzz_media --seconds 120 [--seed 1] [--keep /tmp/mutants]

scripts/fuzz.sh runs it after the schemathesis run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from contract.audio import InvalidAudioError, check_audio, decode_audio
from contract.imaging import InvalidImageError, check_image, configure_pixel_limit, decode_image, inspect_image
from tests.support.audio import CLIP_FORMATS, speech_clip

MAX_PIXELS = 40_000_000
Decoder = Callable[[bytes], object]


def _images() -> dict[str, bytes]:
    """A small drawing in every accepted image format, with EXIF where the format carries it."""
    base = Image.linear_gradient("L").resize((96, 72)).convert("RGB")
    ImageDraw.Draw(base).ellipse((10, 10, 60, 50), fill=(200, 60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "camera"
    samples = {}
    for name, fmt, options in (
        ("jpeg", "JPEG", {"exif": exif}),
        ("progressive-jpeg", "JPEG", {"progressive": True}),
        ("png", "PNG", {"exif": exif}),
        ("webp", "WEBP", {}),
        ("gif", "GIF", {}),
        ("bmp", "BMP", {}),
        ("tiff", "TIFF", {"exif": exif}),
        ("lzw-tiff", "TIFF", {"compression": "tiff_lzw"}),
    ):
        buffer = io.BytesIO()
        (base.convert("P") if fmt == "GIF" else base).save(buffer, fmt, **options)
        samples[name] = buffer.getvalue()
    return samples


def _decoders() -> list[tuple[str, dict[str, bytes], type[Exception], list[tuple[str, Decoder]]]]:
    configure_pixel_limit(MAX_PIXELS)
    audio = [
        ("check_audio", lambda data: check_audio(data, min_seconds=0.5, max_seconds=30)),
        ("decode_audio", lambda data: decode_audio(data, sample_rate=24000, min_seconds=0.5, max_seconds=30)),
    ]
    images = [
        ("check_image", lambda data: check_image(data, MAX_PIXELS)),
        ("inspect_image", lambda data: inspect_image(data, MAX_PIXELS)),
        ("decode_image", lambda data: decode_image(data, MAX_PIXELS, 32, keep_alpha=True)),
    ]
    clips = {fmt: speech_clip(fmt) for fmt in CLIP_FORMATS}
    return [("clip", clips, InvalidAudioError, audio), ("image", _images(), InvalidImageError, images)]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """libtiff and FFmpeg write a line to the process's stderr for every corrupt file they meet."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A few random changes, most near the start (headers), some anywhere; sometimes cut short."""
    mutant = bytearray(data)
    for _ in range(rng.choice((1, 2, 4, 16))):
        if not mutant:
            break
        where = rng.randrange(min(len(mutant), rng.choice((64, 512, len(mutant)))))
        kind = rng.random()
        if kind < 0.6:
            mutant[where] = rng.randrange(256)
        elif kind < 0.8:
            del mutant[where : where + rng.randrange(1, 200)]
        else:
            mutant[where:where] = rng.randbytes(rng.randrange(1, 50))
    if len(mutant) > 1 and rng.random() < 0.2:
        mutant = mutant[: rng.randrange(1, len(mutant))]
    return bytes(mutant) or b"\0"


def _fuzz(
    samples: dict[str, bytes],
    refusal: type[Exception],
    decoders: list[tuple[str, Decoder]],
    deadline: float,
    rng: random.Random,
    found: dict[tuple[str, str, str], str],
    keep: Path,
    kind: str,
) -> int:
    """Mutants of `samples` through `decoders` until `deadline`; what else than `refusal` they raise goes into
    `found` (the mutant saved under `keep`). Returns how many mutants were tried."""
    tried = 0
    while time.monotonic() < deadline:
        name = rng.choice(sorted(samples))
        mutant = mutate(samples[name], rng)
        tried += 1
        for label, decode in decoders:
            try:
                with contextlib.suppress(refusal):
                    decode(mutant)
            except Exception as exc:  # any other exception is what this looks for
                key = (f"{kind} {name}", label, type(exc).__name__)
                if key not in found:
                    keep.mkdir(parents=True, exist_ok=True)
                    saved = keep / f"{kind}-{name}-{label}-{type(exc).__name__}.bin"
                    saved.write_bytes(mutant)
                    found[key] = f"{traceback.format_exc(limit=-3)}saved as {saved}\n"
    return tried


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="time for each kind (clips, images)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=Path("mutants"), help="where failing mutants are saved")
    arguments = parser.parse_args()
    rng = random.Random(arguments.seed)
    found: dict[tuple[str, str, str], str] = {}
    warnings.simplefilter("ignore")  # Pillow warns about every corrupt EXIF it meets
    for kind, samples, refusal, decoders in _decoders():
        deadline = time.monotonic() + arguments.seconds
        with _quiet_stderr():
            tried = _fuzz(samples, refusal, decoders, deadline, rng, found, arguments.keep, kind)
        sys.stdout.write(f"{kind}: {tried} mutants of {len(samples)} formats\n")
    for (source, label, error), detail in found.items():
        sys.stdout.write(f"\n{error} from {label} on a mutated {source}:\n{detail}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
