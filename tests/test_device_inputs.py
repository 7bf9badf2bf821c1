"""Inputs made on the accelerator (models/clip_inputs.py) agree with open_clip's own Pillow transforms. The same
tensor code runs on the CPU here, so the check does not need a GPU: the inputs are close pixel for pixel, and the
vectors from draft-decoded pixels resized by torch agree with the plain path's by the nearest-and-within-a-tenth
rule. JPEGs decoded by the device's decoder (nvJPEG on CUDA; the same call decodes with libjpeg-turbo on the CPU)
agree by the same rule, and whatever that decoder should not or cannot take goes to Pillow."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from contract.imaging import ImageInfo, InvalidImageError, decode_image
from contract.thumbnails import thumbnail_from_bytes, thumbnail_from_pixels, thumbnail_size
from models.clip import ClipEmbedder
from models.clip_inputs import DeviceInputs, EncodedJpeg
from models.tiny import clip as tiny_clip
from processor.handlers.image_index import pillow_inputs, prepare_image
from tests.support.agreement import assert_vectors_agree
from tests.support.images import drawing

MAX_PIXELS = 50_000_000
THUMBNAIL_SIDE = 384


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    drawing(seed, size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny(model_cache):
    model, _, preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{tiny_clip.ensure(model_cache)}", pretrained=None
    )
    return model.eval(), preprocess


def test_the_device_inputs_match_the_pillow_transforms(tiny):
    model, preprocess = tiny
    inputs = DeviceInputs.from_config(model.visual.preprocess_cfg)
    assert inputs is not None
    for size in ((1024, 768), (300, 500), (32, 32), (20, 90)):
        image = drawing(5, size)
        made = inputs.batch([DeviceInputs.pixels(image)], torch.device("cpu"), torch.float32)[0]
        reference = preprocess(image)
        assert made.shape == reference.shape
        assert (made - reference).abs().mean() < 0.02, size


def test_vectors_from_device_inputs_agree_with_the_plain_path(tiny):
    model, preprocess = tiny
    cpu = torch.device("cpu")
    plain = ClipEmbedder(model, preprocess, None, "tiny", cpu, image_tower=True)
    on_device = ClipEmbedder(model, preprocess, None, "tiny", cpu, image_tower=True, inputs_on_device=True)
    photos = [jpeg(seed, (1024, 768)) for seed in range(32)]
    reference = plain.embed_images([decode_image(data, MAX_PIXELS).image for data in photos])
    fast = on_device.embed_prepared(
        [prepare_image(on_device, data, MAX_PIXELS, THUMBNAIL_SIDE).inputs for data in photos]
    )
    assert_vectors_agree(fast, reference)


def test_models_whose_preprocessing_is_not_reproduced_keep_open_clips():
    assert DeviceInputs.from_config({"size": 224, "interpolation": "bilinear", "resize_mode": "shortest"}) is None
    assert DeviceInputs.from_config({"size": (224, 256), "interpolation": "bicubic", "resize_mode": "shortest"}) is None
    assert DeviceInputs.from_config(None) is None


def test_an_image_smaller_than_the_input_is_scaled_up_as_pillow_does(tiny):
    model, preprocess = tiny
    inputs = DeviceInputs.from_config(model.visual.preprocess_cfg)
    image = Image.new("RGB", (8, 6), (200, 30, 90))
    made = inputs.batch([DeviceInputs.pixels(image)], torch.device("cpu"), torch.float32)[0]
    assert torch.allclose(made, preprocess(image), atol=0.02)


def test_a_batch_of_mixed_sizes_keeps_its_order(tiny):
    model, _ = tiny
    inputs = DeviceInputs.from_config(model.visual.preprocess_cfg)
    images = [drawing(seed, (64, 48) if seed % 2 else (50, 90)) for seed in range(6)]
    made = inputs.batch([DeviceInputs.pixels(image) for image in images], torch.device("cpu"), torch.float32)
    for row, image in zip(made, images, strict=True):
        alone = inputs.batch([DeviceInputs.pixels(image)], torch.device("cpu"), torch.float32)[0]
        assert torch.equal(row, alone)


def test_plain_jpegs_decoded_on_the_device_agree_and_the_rest_take_pillow(tiny):
    model, preprocess = tiny
    plain = ClipEmbedder(model, preprocess, None, "tiny", torch.device("cpu"), image_tower=True)
    fast = decoding_on_device(tiny)
    photos = [jpeg(seed, (1024, 768)) for seed in range(32)]
    others = [rotated_jpeg(40), cmyk_jpeg(41), png(42)]  # Pillow's: EXIF rotation, CMYK, not a JPEG
    prepared = [prepare_image(fast, data, MAX_PIXELS, THUMBNAIL_SIDE) for data in photos + others]
    waiting = [made.inputs for made in prepared if isinstance(made.inputs, EncodedJpeg)]
    assert [encoded.data for encoded in waiting] == photos
    assert prepared[0].info == ImageInfo("image/jpeg", "jpg", 1024, 768, len(photos[0]), plain_jpeg=True)
    decoded = iter(fast.decode_jpegs([encoded.data for encoded in waiting]))
    inputs = [next(decoded) if isinstance(made.inputs, EncodedJpeg) else made.inputs for made in prepared]
    reference = plain.embed_images([decode_image(data, MAX_PIXELS).image for data in photos + others])
    assert_vectors_agree(fast.embed_prepared(inputs), reference)


def test_a_jpeg_the_device_decoder_refuses_is_found_and_gets_pillows_verdict(tiny):
    fast = decoding_on_device(tiny)
    good, truncated = jpeg(1, (1024, 768)), jpeg(2, (1024, 768))[:4000]
    decoded = fast.decode_jpegs([good, truncated, good])
    assert decoded[1] is None and decoded[0] is not None and decoded[2] is not None
    with pytest.raises(InvalidImageError) as refused:
        pillow_inputs(fast, truncated, MAX_PIXELS, THUMBNAIL_SIDE)
    assert refused.value.code == "corrupt_image"


@pytest.mark.parametrize("size", [(1024, 768), (500, 700), (640, 480), (300, 200)])
def test_thumbnails_scaled_on_the_device_look_like_pillows(tiny, size):
    """The GPU path's thumbnail (decoded and scaled on the device, WebP-encoded on the CPU) against the one made
    from the bytes by Pillow: the same size, and the same picture within WebP's own noise."""
    fast = decoding_on_device(tiny)
    photos = [jpeg(seed, size) for seed in range(3)]
    decoded = fast.decode_jpegs(photos)
    sizes = [thumbnail_size(size[0], size[1], THUMBNAIL_SIDE)] * len(photos)
    for data, pixels in zip(photos, fast.shrink(decoded, sizes), strict=True):
        assert pixels.shape == (sizes[0][1], sizes[0][0], 3) and pixels.dtype == np.uint8
        made, reference = (
            webp_pixels(thumbnail_from_pixels(pixels)),
            webp_pixels(thumbnail_from_bytes(data, MAX_PIXELS, THUMBNAIL_SIDE)),
        )
        assert made.shape == reference.shape
        assert np.abs(made.astype(np.int16) - reference).mean() < 1.0  # two different drawings: 90-117


def test_shrinking_a_batch_of_mixed_sizes_keeps_its_order(tiny):
    fast = decoding_on_device(tiny)
    photos = [jpeg(seed, (640, 480) if seed % 2 else (480, 640)) for seed in range(4)]
    decoded = fast.decode_jpegs(photos)
    sizes = [(384, 288) if seed % 2 else (288, 384) for seed in range(4)]
    together = fast.shrink(decoded, sizes)
    for pixels, image, target in zip(together, decoded, sizes, strict=True):
        assert np.array_equal(pixels, fast.shrink([image], [target])[0])


def webp_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP"
        return np.asarray(image.convert("RGB"))


def decoding_on_device(tiny) -> ClipEmbedder:
    """The CUDA set-up (inputs made and JPEGs decoded by the device's code), on the CPU."""
    model, preprocess = tiny
    cpu = torch.device("cpu")
    return ClipEmbedder(
        model, preprocess, None, "tiny", cpu, image_tower=True, inputs_on_device=True, jpeg_on_device=True
    )


def rotated_jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    drawing(seed, (1024, 768)).save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def cmyk_jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    drawing(seed, (640, 480)).convert("CMYK").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    drawing(seed, (500, 300)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_large_groups_are_resized_a_few_at_a_time_with_the_same_result(tiny, monkeypatch):
    inputs = DeviceInputs.from_config(tiny[0].visual.preprocess_cfg)
    pixels = [DeviceInputs.pixels(drawing(seed, (400, 300))) for seed in range(5)]
    cpu = torch.device("cpu")
    whole = inputs.batch(pixels, cpu, torch.float32)
    resized: list[int] = []
    resize = DeviceInputs._resize_and_crop

    def counted(self: DeviceInputs, group: torch.Tensor) -> torch.Tensor:
        resized.append(len(group))
        return resize(self, group)

    monkeypatch.setattr("models.clip_inputs._PIXELS_AT_ONCE", 2 * 400 * 300)
    monkeypatch.setattr(DeviceInputs, "_resize_and_crop", counted)
    assert torch.equal(inputs.batch(pixels, cpu, torch.float32), whole)
    assert resized == [2, 2, 1]
