"""Image decoding with the checks every upload and queued image goes through."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# format name (Pillow) -> (content type, file extension)
FORMATS: dict[str, tuple[str, str]] = {
    "JPEG": ("image/jpeg", "jpg"),
    "PNG": ("image/png", "png"),
    "WEBP": ("image/webp", "webp"),
    "GIF": ("image/gif", "gif"),
    "BMP": ("image/bmp", "bmp"),
    "TIFF": ("image/tiff", "tiff"),
}


class InvalidImageError(ValueError):
    """The bytes are not an image we can index; `code` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class DecodedImage:
    image: Image.Image
    content_type: str
    extension: str
    width: int
    height: int
    size: int


def configure_pixel_limit(max_pixels: int) -> None:
    """Pillow's own decompression-bomb guard, set to the configured limit (it raises at twice this)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: bytes, max_pixels: int, min_side: int | None = None) -> DecodedImage:
    """Fully decode `data` (first frame), or raise InvalidImageError saying what is wrong. With `min_side`, a JPEG
    is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8) that keeps both sides at `min_side` or more
    (never upsampled), which is what an embedding needs and several times cheaper; width and height still
    describe the original."""
    if not data:
        raise InvalidImageError("empty_file", "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            fmt = opened.format or ""
            width, height = opened.size
            if width * height > max_pixels:
                raise InvalidImageError(
                    "too_many_pixels",
                    f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                )
            if fmt not in FORMATS:
                raise InvalidImageError(
                    "unsupported_format",
                    f"image format {fmt or 'unknown'} is not supported; use one of {', '.join(FORMATS)}",
                )
            if min_side is not None and fmt == "JPEG":
                opened.draft("RGB", (min_side, min_side))
            opened.load()
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError("too_many_pixels", f"the image has too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImageError(
            "not_an_image", f"the bytes are not an image in a known format ({', '.join(FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImageError("corrupt_image", f"the image could not be decoded: {exc}") from None
    content_type, extension = FORMATS[fmt]
    return DecodedImage(
        image=image,
        content_type=content_type,
        extension=extension,
        width=width,
        height=height,
        size=len(data),
    )
