"""Image files decoded straight to their crop: the transforms `ImageFiles` uses for training and evaluation.

`decode_image_file` followed by `train_transform` decodes every pixel of a 500 x 375 JPEG, then throws most of
them away and resamples the rest to a few hundred. Here the crop box is drawn from the size in the file's
header before any pixel is decoded, and a JPEG is decoded at the smallest of libjpeg's DCT scalings (1/2, 1/4,
1/8: Pillow's `Image.draft`) that still gives the box at least the output's resolution; only the box's pixels
are copied out and resampled, antialiased, by torch's uint8 kernel. The worker returns the uint8 crop; flips,
normalisation and the other augmentations run on whole batches (`BatchAugment`), as for in-memory data.

The boxes are drawn exactly as by `train_transform` / `eval_transform` (from torch's generator, which
`BatchSource` seeds per image), so a resumed run sees the same crops; a bad file raises `BadImage` like
`decode_image_file`, so `ImageFiles` skips and counts it as before. Images with 16-bit or float pixels go
through `decode_image_file` (which scales them to 8 bits) and are cropped as tensors.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import BadImage, decode_image_file, eval_transform, open_image_file, train_transform

__all__ = ["eval_file_transform", "train_file_transform"]

Box = tuple[float, float, float, float]  # left, top, right, bottom, in the file's pixels

# Pillow modes that `Image.convert("RGB")` turns into 8-bit RGB as `decode_image_file` would; others (16-bit,
# 32-bit, float) take the tensor path.
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})


class _FileCrop:
    """Decodes an image file to the `size` x `size` resampling of a box drawn from its header size."""

    def __init__(self, size: int, interpolation: str):
        self.size = size
        self.interpolation = interpolation

    def box(self, height: int, width: int) -> Box:
        """The box of the image to resample to the output size."""
        raise NotImplementedError

    def load_file(self, path: str | os.PathLike[str]) -> Tensor:
        """The uint8 `3 x size x size` crop of the image file at `path`; `BadImage` for a bad file."""
        image = open_image_file(path)
        width, height = image.size
        left, top, right, bottom = self.box(height, width)
        if image.mode not in _EIGHT_BIT_MODES:
            return self._resample(decode_image_file(path), (left, top, right, bottom))
        try:
            # Ask libjpeg for an image whose box is at least `size` pixels wide and high (a no-op but for JPEG).
            image.draft("RGB", (math.ceil(width * self.size / (right - left)),
                                math.ceil(height * self.size / (bottom - top))))
            fx, fy = image.size[0] / width, image.size[1] / height
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            box = _whole_pixels((left * fx, top * fy, right * fx, bottom * fy), rgb.size)
            pixels = torch.from_numpy(np.array(rgb.crop(box), dtype=np.uint8)).permute(2, 0, 1)
        except Exception as exc:  # truncated or corrupt data surfaces only while decoding
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise BadImage(f"corrupt or truncated image data ({reason})") from exc
        return self._resample(pixels, (0, 0, pixels.shape[2], pixels.shape[1]))

    def _resample(self, image: Tensor, box: Box) -> Tensor:
        """The `box` of a uint8 `3 x H x W` image resampled to `size` x `size`, antialiased: torch's uint8 kernel
        (the one `train_transform` / `eval_transform` use), faster than Pillow's (docs/imagenet.md)."""
        left, top, right, bottom = _whole_pixels(box, (image.shape[2], image.shape[1]))
        # a batch of one whose strides say channels-last where the pixels are height x width x channel (as decoded
        # by Pillow): the kernel then keeps that layout, faster, and `collate_skip_bad` copies it without transposing
        crop = image[:, top:bottom, left:right].permute(1, 2, 0).unsqueeze(0).permute(0, 3, 1, 2)
        return F.interpolate(crop, size=(self.size, self.size), mode=self.interpolation,
                             antialias=self.interpolation != "nearest")[0]


def _whole_pixels(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """`box` rounded to whole pixels of an image of `size` (width, height), at least one pixel wide and high."""
    width, height = size
    left, top = min(round(box[0]), width - 1), min(round(box[1]), height - 1)
    return left, top, min(max(round(box[2]), left + 1), width), min(max(round(box[3]), top + 1), height)


class _FileTrainCrop(_FileCrop):
    """Random-resized crop from the file (see `train_file_transform`)."""

    def __init__(self, img_size: int, scale: tuple[float, float], ratio: tuple[float, float], interpolation: str):
        self.crop = train_transform(img_size, scale, ratio, interpolation)  # checks the arguments, draws the boxes
        super().__init__(self.crop.size, self.crop.interpolation.value)

    def box(self, height: int, width: int) -> Box:
        top, left, h, w = self.crop.params(height, width)
        return left, top, left + w, top + h

    def __repr__(self) -> str:
        return f"train_file_{self.crop!r}"


class _FileEvalCrop(_FileCrop):
    """Central crop from the file (see `eval_file_transform`)."""

    def __init__(self, img_size: int, crop_pct: float, interpolation: str):
        self.crop = eval_transform(img_size, crop_pct, interpolation)  # checks the arguments
        super().__init__(self.crop.size, self.crop.interpolation.value)

    def box(self, height: int, width: int) -> Box:
        # the shorter side resized to `resize_to`, then `size` kept: a square of this side in the file
        side = self.size * min(height, width) / self.crop.resize_to
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side

    def __repr__(self) -> str:
        return f"eval_file_{self.crop!r}"


def train_file_transform(img_size: int, scale: tuple[float, float] = (0.08, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3),
                         interpolation: str = "bilinear") -> _FileCrop:
    """The training transform of `ImageFiles` that decodes only what its random-resized crop needs.

    Bilinear by default, as torchvision's `RandomResizedCrop` (timm's training crop draws bilinear or bicubic):
    bicubic resampling reads twice as many pixels per output pixel.

    Args:
        img_size: the side of the square output.
        scale: the range of the box's share of the image area.
        ratio: the range of the box's aspect ratio (drawn log-uniformly).
        interpolation: `bicubic`, `bilinear` or `nearest`.

    Returns:
        A picklable transform whose `load_file(path)` gives uint8 `3 x img_size x img_size`, the box drawn
        as by `train_transform` from torch's generator.
    """
    return _FileTrainCrop(img_size, scale, ratio, interpolation)


def eval_file_transform(img_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic") -> _FileCrop:
    """The evaluation transform of `ImageFiles` that decodes only what its central crop needs: the region
    `eval_transform` keeps (shorter side to `floor(img_size / crop_pct)`, central `img_size` square).

    Args:
        img_size: the side of the square output.
        crop_pct: the share of the resized shorter side kept (1.0: the whole shorter side).
        interpolation: `bicubic`, `bilinear` or `nearest`.

    Returns:
        A picklable, deterministic transform whose `load_file(path)` gives uint8 `3 x img_size x img_size`.
    """
    return _FileEvalCrop(img_size, crop_pct, interpolation)
