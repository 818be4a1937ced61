"""Image transforms of the CAM stages (the IRN recipe, irn_deeplab.md §0.2 and §1.2).

Training: random long-side resize (PIL bicubic), horizontal flip, ImageNet normalisation, random
crop with zero padding (0 = the mean colour after normalisation). Inference: multi-scale resize
with flips. Every number comes from the caller (config); randomness comes from an explicit
``numpy.random.Generator`` so augmentation is reproducible whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(img: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """uint8 HxWx3 RGB -> float32 HxWx3, ``(x/255 - mean) / std``."""
    x = img.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def resize(img: np.ndarray, size_hw: Tuple[int, int], resample=Image.BICUBIC) -> np.ndarray:
    h, w = size_hw
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), resample=resample))


def rescale(img: np.ndarray, scale: float, resample=Image.BICUBIC) -> np.ndarray:
    """Resize by ``scale`` with target size ``round(h*s), round(w*s)`` (IRN ``pil_rescale``)."""
    h, w = img.shape[:2]
    return resize(img, (max(1, int(round(h * scale))), max(1, int(round(w * scale)))), resample)


def resize_long(img: np.ndarray, long_side: int, resample=Image.BICUBIC) -> np.ndarray:
    h, w = img.shape[:2]
    return rescale(img, long_side / max(h, w), resample)


def random_crop_boxes(h: int, w: int, crop: int, rng: np.random.Generator):
    """Source and destination windows of an IRN-style random crop of a ``crop x crop`` canvas.

    Per axis: if the image is larger than the crop, a random window of the image is taken; otherwise
    the whole image is placed at a random offset in the canvas (the rest stays padding).
    Returns ``(src_y, src_x, dst_y, dst_x, ch, cw)``.
    """

    def axis(size: int):
        if size > crop:
            return int(rng.integers(0, size - crop + 1)), 0, crop
        return 0, int(rng.integers(0, crop - size + 1)), size

    sy, dy, ch = axis(h)
    sx, dx, cw = axis(w)
    return sy, sx, dy, dx, ch, cw


def random_crop(arrays: Sequence[np.ndarray], crop: int, rng: np.random.Generator, pad_values: Sequence[float]):
    """Crop several aligned arrays (HxW or HxWxC) with one random box; pad with ``pad_values``."""
    h, w = arrays[0].shape[:2]
    sy, sx, dy, dx, ch, cw = random_crop_boxes(h, w, crop, rng)
    out = []
    for a, pad in zip(arrays, pad_values):
        canvas = np.full((crop, crop) + a.shape[2:], pad, dtype=a.dtype)
        canvas[dy : dy + ch, dx : dx + cw] = a[sy : sy + ch, sx : sx + cw]
        out.append(canvas)
    return out


@dataclass(frozen=True)
class TrainTransform:
    """The IRN classification-training transform; all numbers from config."""

    resize_long: Tuple[int, int] = (320, 640)
    crop_size: int = 512
    hflip: bool = True
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.resize_long
        img = resize_long(img, int(rng.integers(lo, hi + 1)))
        if self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
        x = normalize(img, self.mean, self.std)
        (x,) = random_crop([x], self.crop_size, rng, pad_values=[0.0])
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def multiscale_views(img: np.ndarray, scales: Sequence[float], flip: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """For each scale, a ``2x3xhxw`` (or ``1x3xhxw`` without flip) float32 array: image and its flip."""
    views = []
    for s in scales:
        im = img if s == 1.0 else rescale(img, s)
        x = normalize(im, mean, std).transpose(2, 0, 1)
        views.append(np.ascontiguousarray(np.stack([x, x[:, :, ::-1]]) if flip else x[None]))
    return views
