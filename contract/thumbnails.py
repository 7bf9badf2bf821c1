"""Thumbnails of indexed images: WebP, longest side at most THUMBNAIL_MAX_SIDE, EXIF orientation applied, never
upscaled, RGB (RGBA when the image has transparency)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from contract.imaging import decode_image

THUMBNAIL_CONTENT_TYPE = "image/webp"
_QUALITY = 80
_METHOD = 0  # libwebp's fastest encoder setting; at thumbnail sizes the files are barely larger
_REDUCING_GAP = 2.0  # as Image.thumbnail: an integer reduce first, then bicubic over at least this factor


def thumbnail_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The thumbnail's size: the longest side at `max_side`, the aspect kept; a smaller image keeps its size."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def make_thumbnail(image: Image.Image, max_side: int) -> bytes:
    """The WebP thumbnail of an already decoded (and oriented) RGB or RGBA image; the image is left as it was."""
    size = thumbnail_size(image.width, image.height, max_side)
    small = image if size == image.size else image.resize(size, Image.Resampling.BICUBIC, reducing_gap=_REDUCING_GAP)
    try:
        buffer = io.BytesIO()
        small.save(buffer, format="WEBP", quality=_QUALITY, method=_METHOD)
        return buffer.getvalue()
    finally:
        if small is not image:
            small.close()


def thumbnail_from_pixels(pixels: np.ndarray) -> bytes:
    """The WebP thumbnail of RGB pixels already scaled to the thumbnail's size (uint8, rows first)."""
    with Image.fromarray(pixels) as image:
        return make_thumbnail(image, max(image.size))


def thumbnail_from_bytes(data: bytes, max_pixels: int, max_side: int) -> bytes:
    """The WebP thumbnail of an encoded image, with the checks of `decode_image` (InvalidImageError); a JPEG is
    decoded at the smallest DCT scale that keeps its longest side at `max_side` or more."""
    decoded = decode_image(data, max_pixels, min_longest=max_side, keep_alpha=True)
    try:
        return make_thumbnail(decoded.image, max_side)
    finally:
        decoded.image.close()
