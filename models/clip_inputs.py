"""Image inputs for the CLIP tower made on the accelerator.

On the CPU, open_clip's own transforms (Pillow resize, crop, to tensor, normalise) make each input. On a GPU they
cap a batch at a few hundred images per second (measured on an H100 with 16 CPU threads: 511 images/s, against
5,000 for the bfloat16 tower) and hand over float32 tensors four times the size of the pixels. Here the decode
workers only turn the decoded image into a uint8 tensor, and the resize (bicubic, antialiased, like Pillow's),
centre crop and normalisation run on the device for the whole batch. Plain JPEGs can skip the CPU's decode
altogether: `decode_jpegs` decodes a batch's on the device (nvJPEG on CUDA) into the same uint8 tensors, and
`shrink` scales them there to their thumbnails' size, so the CPU only encodes the thumbnails.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True, slots=True)
class EncodedJpeg:
    """A plain JPEG waiting to be decoded on the device with the rest of its batch (`DeviceInputs.decode_jpegs`)."""

    data: bytes


# open_clip's resize modes this module reproduces: the shorter side to the input size then a centre crop, or both
# sides to the input size
_MODES = ("shortest", "squash")
# pixels resized in one call: 64 megapixels are 768 MB as float32 RGB
_PIXELS_AT_ONCE = 64_000_000


@dataclass(frozen=True)
class DeviceInputs:
    """The tower's preprocessing, from open_clip's `preprocess_cfg`, applied to uint8 pixels on the device."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> DeviceInputs | None:
        """None when the model's preprocessing is not one this module reproduces (the caller keeps open_clip's)."""
        if not config or config.get("interpolation") != "bicubic" or config.get("resize_mode") not in _MODES:
            return None
        size = config["size"]
        height, width = (size, size) if isinstance(size, int) else size
        if config["resize_mode"] == "shortest" and height != width:
            return None
        return cls(int(height), int(width), tuple(config["mean"]), tuple(config["std"]), config["resize_mode"])

    @staticmethod
    def decode_jpegs(jpegs: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
        """JPEGs' RGB pixels, uint8, channels first, decoded on `device` in one call (nvJPEG on CUDA, batched in
        hardware where the GPU has a JPEG engine; libjpeg-turbo on the CPU); None for one the decoder refuses (the
        caller falls back to Pillow, which says what is wrong). No EXIF rotation: give it only images that need
        none."""
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(batch: list[bytes]) -> list[torch.Tensor]:
            encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in batch]
            with warnings.catch_warnings():
                # deprecated since torchvision 0.29 in favour of torchcodec; the decoder of the pinned torchvision
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)

        try:
            return list(decode(list(jpegs)))
        except RuntimeError:  # one bad JPEG fails the whole call: find it
            decoded: list[torch.Tensor | None] = []
            for data in jpegs:
                try:
                    decoded.append(decode([data])[0])
                except RuntimeError:
                    decoded.append(None)
            return decoded

    @staticmethod
    def shrink(images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Images decoded on the device (`decode_jpegs`), each scaled to its (width, height) in `sizes` there
        (bicubic, antialiased, like Pillow's resize) and brought back as uint8 RGB arrays, rows first: what a
        thumbnail is encoded from, without decoding the JPEG a second time on the CPU. Images of one size and target
        go together."""

        def scale(group: torch.Tensor, target: tuple[int, int]) -> Sequence[np.ndarray]:
            width, height = target
            if (height, width) != tuple(group.shape[2:]):
                group = F.interpolate(
                    group.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
                )
                group = group.clamp(0, 255).round().to(torch.uint8)
            return list(group.permute(0, 2, 3, 1).contiguous().cpu().numpy())

        return _in_groups(images, sizes, scale)

    @staticmethod
    def pixels(image: Image.Image) -> torch.Tensor:
        """In a decode worker: the RGB image as a uint8 tensor, channels first (one copy of the pixels)."""
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)

    def batch(self, inputs: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The normalised batch on `device`; images of one size go through resize and crop together."""
        made = _in_groups(
            inputs,
            [None] * len(inputs),
            lambda group, _: list(self._resize_and_crop(group.to(device, non_blocking=True).float())),
        )
        mean = torch.tensor(self.mean, device=device).view(3, 1, 1)
        std = torch.tensor(self.std, device=device).view(3, 1, 1)
        return ((torch.stack(made) / 255.0 - mean) / std).to(dtype)

    def _resize_and_crop(self, image: torch.Tensor) -> torch.Tensor:
        """Images of one size, N x 3 x H x W, as float pixel values."""
        _, _, height, width = image.shape
        if self.resize_mode == "squash":
            size = (self.height, self.width)
        elif height <= width:  # torchvision's Resize(int): the shorter side to it, the longer in proportion
            size = (self.height, int(self.height * width / height))
        else:
            size = (int(self.width * height / width), self.width)
        if size != (height, width):
            # Pillow's bicubic resize: antialiased when shrinking, values kept in 0..255 and rounded
            image = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
            image = image.clamp(0, 255).round()
        top = round((image.shape[2] - self.height) / 2.0)  # torchvision's CenterCrop
        left = round((image.shape[3] - self.width) / 2.0)
        return image[:, :, top : top + self.height, left : left + self.width]


Item = TypeVar("Item")
Extra = TypeVar("Extra", bound=Hashable)


def _in_groups(
    images: Sequence[torch.Tensor],
    extras: Sequence[Extra],
    work: Callable[[torch.Tensor, Extra], Sequence[Item]],
) -> list[Item]:
    """`work` on stacks of the images that share a size and an extra (one result per image, in order), at most
    `_PIXELS_AT_ONCE` pixels at a time: a batch of full-size photos decoded on the GPU would otherwise need several
    gigabytes as floats. A bucket's photos mostly share a few sizes, so most go through in a few calls."""
    made: list[Item | None] = [None] * len(images)
    groups: dict[tuple[tuple[int, ...], Extra], list[int]] = defaultdict(list)
    for position, (image, extra) in enumerate(zip(images, extras, strict=True)):
        groups[(tuple(image.shape), extra)].append(position)
    for (shape, extra), same in groups.items():
        at_once = max(1, _PIXELS_AT_ONCE // (shape[1] * shape[2]))
        for start in range(0, len(same), at_once):
            positions = same[start : start + at_once]
            results = work(torch.stack([images[position] for position in positions]), extra)
            for position, result in zip(positions, results, strict=True):
                made[position] = result
    return cast(list[Item], made)
