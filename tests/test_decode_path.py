"""The indexing decode path: JPEGs decoded at the smallest DCT scale the model needs (never upsampled, EXIF
orientation kept, the original's size recorded), and embeddings from it that agree with the plain full decode:
each fast vector's nearest plain vector is its own image's, closer than a tenth of the median distance between
different images."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from contract.imaging import InvalidImageError, check_image, decode_image
from models.clip import ClipEmbedder
from processor.handlers.image_index import prepare_image
from tests.support.agreement import assert_vectors_agree
from tests.support.images import drawing, encoded

MAX_PIXELS = 50_000_000
THUMBNAIL_SIDE = 384


def jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("size", "min_side", "decoded"),
    [((1024, 768), 256, (512, 384)), ((1024, 768), 32, (128, 96)), ((200, 150), 256, (200, 150))],
    ids=["half", "eighth", "small-stays"],
)
def test_a_jpeg_is_decoded_at_the_smallest_scale_not_below_the_model_input(size, min_side, decoded):
    result = decode_image(jpeg(drawing(1, size)), MAX_PIXELS, min_side=min_side)
    assert result.image.size == decoded
    assert (result.width, result.height) == size, "the record describes the original"


def test_other_formats_and_plain_decodes_are_full_size():
    assert decode_image(encoded(1, "PNG", (1024, 768)), MAX_PIXELS, min_side=32).image.size == (1024, 768)
    assert decode_image(jpeg(drawing(1, (1024, 768))), MAX_PIXELS).image.size == (1024, 768)


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_the_apis_check_at_an_eighth_gives_the_full_decodes_verdict(progressive):
    """The upload's check decodes a JPEG at 1/8 scale: it still reads the whole scan, so a cut file fails it as it
    fails the full decode, and a whole one passes with the original's facts."""
    buffer = io.BytesIO()
    drawing(3, (1024, 768)).save(buffer, format="JPEG", quality=90, progressive=progressive)
    whole = buffer.getvalue()
    info = check_image(whole, MAX_PIXELS)
    assert (info.width, info.height, info.content_type, info.size) == (1024, 768, "image/jpeg", len(whole))
    for cut in (len(whole) // 3, len(whole) * 2 // 3, len(whole) - 40):
        with pytest.raises(InvalidImageError) as full:
            decode_image(whole[:cut], MAX_PIXELS)
        with pytest.raises(InvalidImageError) as checked:
            check_image(whole[:cut], MAX_PIXELS)
        assert checked.value.code == full.value.code == "corrupt_image"


def test_exif_orientation_is_kept_at_the_reduced_scale():
    result = decode_image(jpeg(drawing(2, (1024, 768)), orientation=6), MAX_PIXELS, min_side=256)
    assert result.image.size == (384, 512)


def _odd_exif(orientation: int) -> bytes:
    """An EXIF block with the orientation and an XResolution stored as text instead of a fraction."""
    entries = [(0x0112, 3, 1, struct.pack("<HH", orientation, 0)), (0x011A, 2, 4, b"abc\0")]
    ifd = b"".join(struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    return b"Exif\0\0II*\0" + struct.pack("<IH", 8, len(entries)) + ifd + struct.pack("<I", 0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_odd_exif_value_does_not_stop_a_decode_or_its_orientation(orientation):
    """Pillow's exif_transpose writes the EXIF back and failed on the text where a fraction belongs (a TypeError:
    a 500 at upload, found by mutating images); the image is turned as before and its EXIF not written back."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 20, 30)).save(buffer, format="JPEG", exif=_odd_exif(orientation))
    turned = orientation >= 5
    assert decode_image(buffer.getvalue(), MAX_PIXELS).image.size == ((20, 40) if turned else (40, 20))


def _tiff_with_a_fraction_for_its_strip_offset() -> bytes:
    """A 1x1 grey TIFF whose StripOffsets tag is a RATIONAL (Pillow seeks to it and raised TypeError)."""
    entries = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 5, None), (278, 3, 1)]
    entries.append((279, 4, 1))
    fraction_at = 8 + 2 + 12 * len(entries) + 4
    ifd = b""
    for tag, kind, value in entries:
        if value is None:
            ifd += struct.pack("<HHII", tag, kind, 1, fraction_at)
        else:
            ifd += struct.pack("<HHIHH" if kind == 3 else "<HHII", tag, kind, 1, value, *((0,) if kind == 3 else ()))
    tail = struct.pack("<I", 0) + struct.pack("<II", fraction_at + 8, 1) + b"\x80"
    return b"II*\0" + struct.pack("<IH", 8, len(entries)) + ifd + tail


def test_a_tiff_tag_of_the_wrong_type_is_a_corrupt_image():
    data = _tiff_with_a_fraction_for_its_strip_offset()
    for decode in (check_image, decode_image):
        with pytest.raises(InvalidImageError) as refused:
            decode(data, MAX_PIXELS)
        assert refused.value.code == "corrupt_image"


def test_fast_path_embeddings_agree_with_the_full_decode(make_settings):
    embedder = ClipEmbedder.load(make_settings())
    photos = [jpeg(drawing(seed, (1024, 768))) for seed in range(32)]
    plain = embedder.embed_images([decode_image(data, MAX_PIXELS).image for data in photos])
    fast = embedder.embed_prepared(
        [prepare_image(embedder, data, MAX_PIXELS, THUMBNAIL_SIDE).inputs for data in photos]
    )
    assert_vectors_agree(fast, plain)
