"""Test images drawn with Pillow: distinct, deterministic, in any format."""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw


def drawing(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        x1, y1 = x0 + rng.randrange(8, 48), y0 + rng.randrange(8, 48)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
    return image


def encoded(seed: int, fmt: str = "PNG", size: tuple[int, int] = (96, 72)) -> bytes:
    buffer = io.BytesIO()
    drawing(seed, size).save(buffer, format=fmt)
    return buffer.getvalue()


def oriented_jpeg(seed: int, size: tuple[int, int], orientation: int) -> bytes:
    """A JPEG stored `size` wide and high whose EXIF orientation tag says how to turn it for display."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    drawing(seed, size).save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()
