"""Image decoding with the checks every upload and queued image goes through."""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

_ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> the transpose that makes the image upright (as Pillow's ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_TURNED = frozenset({5, 6, 7, 8})  # the orientations whose transpose swaps width and height

# Pillow's modes of greyscale with more than 8 bits a sample, which its convert("RGB") clips at 255
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_HIGH_BIT_DEPTH = _SIXTEEN_BIT | {"I", "F"}

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
class ImageInfo:
    """What an image is, from its header, checked as `decode_image` checks it. `width` and `height` are the size it
    is shown at: its EXIF orientation applied (the stored raster's sides swapped for orientations 5 to 8)."""

    content_type: str
    extension: str
    width: int
    height: int
    size: int
    plain_jpeg: bool = False  # an RGB or greyscale JPEG that needs no EXIF rotation: any JPEG decoder can take it


@dataclass(frozen=True, slots=True)
class DecodedImage:
    image: Image.Image
    content_type: str
    extension: str
    width: int
    height: int
    size: int

    def info(self) -> ImageInfo:
        return ImageInfo(self.content_type, self.extension, self.width, self.height, self.size)


def configure_pixel_limit(max_pixels: int) -> None:
    """Pillow's own decompression-bomb guard, set to the configured limit (it raises at twice this)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


@contextmanager
def _opened(data: bytes, max_pixels: int) -> Iterator[tuple[Image.Image, str]]:
    """The image with its header read (format known and allowed, pixel count within the limit), and Pillow's
    errors, here or in the body of the `with`, turned into InvalidImageError."""
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
            yield opened, fmt
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError("too_many_pixels", f"the image has too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImageError(
            "not_an_image", f"the bytes are not an image in a known format ({', '.join(FORMATS)})"
        ) from None
    # TypeError and struct.error: Pillow's TIFF and EXIF parsers meeting a value of the wrong type
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, struct.error) as exc:
        raise InvalidImageError("corrupt_image", f"the image could not be decoded: {exc}") from None


def inspect_image(data: bytes, max_pixels: int) -> ImageInfo:
    """The header's facts, without decoding the pixels; InvalidImageError for what the header already shows wrong
    (a corrupt body shows only when it is decoded)."""
    with _opened(data, max_pixels) as (opened, fmt):
        return _header_info(opened, fmt, len(data))


def check_image(data: bytes, max_pixels: int) -> ImageInfo:
    """What inspect_image says, once the pixels are known to decode: a JPEG is decoded at its smallest scale (1/8,
    several times cheaper), which still reads its whole scan, so a truncated or corrupt body shows as in a full
    decode; other formats are decoded in full. InvalidImageError says what is wrong."""
    with _opened(data, max_pixels) as (opened, fmt):
        info = _header_info(opened, fmt, len(data))
        if fmt == "JPEG":
            opened.draft(None, (1, 1))
        opened.load()
    return info


def _header_info(opened: Image.Image, fmt: str, size: int) -> ImageInfo:
    orientation = _orientation(opened)
    plain = fmt == "JPEG" and opened.mode in ("RGB", "L") and orientation in (0, 1)
    content_type, extension = FORMATS[fmt]
    width, height = _shown_size(opened.size, orientation)
    return ImageInfo(content_type, extension, width, height, size, plain_jpeg=plain)


def _orientation(image: Image.Image) -> object:
    """The EXIF orientation tag's value (1, upright, when there is none); any type a file put there."""
    return image.getexif().get(_ORIENTATION, 1)


def _shown_size(size: tuple[int, int], orientation: object) -> tuple[int, int]:
    """The (width, height) an image of this stored size is shown at once its EXIF orientation is applied."""
    width, height = size
    return (height, width) if orientation in _TURNED else (width, height)


def decode_image(
    data: bytes,
    max_pixels: int,
    min_side: int | None = None,
    *,
    min_longest: int | None = None,
    keep_alpha: bool = False,
) -> DecodedImage:
    """Fully decode `data` (first frame, EXIF orientation applied), or raise InvalidImageError saying what is wrong.
    With `min_side` (and/or `min_longest`), a JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8)
    that keeps both sides at `min_side` or more and the longest side at `min_longest` or more (never upsampled),
    which is what an embedding or a thumbnail needs and several times cheaper; width and height still describe the
    original as it is shown (EXIF orientation applied, as to the image). The image is RGB, or RGBA with
    `keep_alpha` when it has transparency; greyscale of more than 8 bits a sample (16-bit, 32-bit integer, float) is
    scaled to 8 bits on the way, as `_eight_bit` says, not clipped."""
    with _opened(data, max_pixels) as (opened, fmt):
        stored_width, stored_height = opened.size
        orientation = _orientation(opened)
        if (min_side is not None or min_longest is not None) and fmt == "JPEG":
            opened.draft("RGB", draft_request(stored_width, stored_height, min_side or 1, min_longest or 1))
        opened.load()
        alpha = keep_alpha and opened.has_transparency_data
        image = _eight_bit(_upright(opened, orientation), opened.info.get("transparency") if alpha else None)
        image = image.convert("RGBA" if alpha else "RGB")
    content_type, extension = FORMATS[fmt]
    width, height = _shown_size((stored_width, stored_height), orientation)
    return DecodedImage(
        image=image,
        content_type=content_type,
        extension=extension,
        width=width,
        height=height,
        size=len(data),
    )


def _eight_bit(image: Image.Image, transparent: object = None) -> Image.Image:
    """A greyscale image of more than 8 bits a sample as 8-bit greyscale (L), its values scaled where Pillow's
    convert would clip them at 255 (a 16-bit image came out nearly white, a float one in 0..1 black); any other
    image as it is.

    - 16-bit (I;16, I;16B, ...): the top 8 bits of each value.
    - I (32-bit signed): the same when every value is within 0..65535 (a 16-bit image held in 32 bits); otherwise
      its own minimum..maximum stretched over 0..255.
    - F (float): 0..1 onto 0..255 when every finite value is within 0..1; otherwise its own finite minimum..maximum
      stretched over 0..255. Not-a-number comes out as the low end, an infinity as the nearer end.

    A flat image outside those ranges comes out black. With `transparent` (the transparent value a PNG's tRNS gives,
    an int), the result is LA, the pixels of that value transparent."""
    if image.mode not in _HIGH_BIT_DEPTH:
        return image
    values = np.asarray(image)
    sixteen = image.mode in _SIXTEEN_BIT or (image.mode == "I" and values.min() >= 0 and values.max() <= 0xFFFF)
    if sixteen:
        grey = (values.astype(np.uint16) >> 8).astype(np.uint8)
    else:
        grey = _stretched(values.astype(np.float32), nominal=(0.0, 1.0) if image.mode == "F" else None)
    if not isinstance(transparent, int):
        return Image.fromarray(grey, "L")
    alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack((grey, alpha)), "LA")


def _stretched(values: np.ndarray, nominal: tuple[float, float] | None) -> np.ndarray:
    """Float `values` (changed in place) mapped linearly onto 0..255 as uint8: from `nominal` when every finite value
    is within it, else from their own finite minimum..maximum; not-a-number as the low end, an infinity as the
    nearer end; all 0 when that range is empty."""
    finite = np.isfinite(values)
    low = float(values.min(initial=np.inf, where=finite))
    high = float(values.max(initial=-np.inf, where=finite))
    if nominal is not None and nominal[0] <= low and high <= nominal[1]:
        low, high = nominal
    if not high > low:
        return np.zeros(values.shape, np.uint8)
    np.nan_to_num(values, copy=False, nan=low, posinf=high, neginf=low)
    np.clip(values, low, high, out=values)
    values -= low
    values *= 255.0 / (high - low)
    return np.rint(values, out=values).astype(np.uint8)


def _upright(image: Image.Image, orientation: object) -> Image.Image:
    """The image turned as its EXIF `orientation` says. Unlike ImageOps.exif_transpose it does not write the EXIF
    back (nothing downstream keeps it), which failed on a tag value of the wrong type in an image that decodes."""
    transpose = _UPRIGHT.get(orientation)
    return image if transpose is None else image.transpose(transpose)


def draft_request(width: int, height: int, min_side: int, min_longest: int) -> tuple[int, int]:
    """The size to ask Pillow's JPEG draft for (it keeps each side at least the asked one): both sides at
    `min_side` or more, and the longest side at `min_longest` or more."""
    if width >= height:
        return max(min_side, min_longest), min_side
    return min_side, max(min_side, min_longest)
