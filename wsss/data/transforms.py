"""Image transforms of the CAM stages (the IRN recipe: ``misc/imutils.py``, ``step/train_cam.py``).

Training: random long-side resize (PIL bicubic), horizontal flip, optional colour jitter (AEFT
``voc12/data.py``), ImageNet normalisation, random crop with zero padding (0 = the mean colour after
normalisation; docs/official_code.md, "CAM-stage image pipelines"). Inference: multi-scale resize
with flips. Every number comes from the caller (config); randomness comes from an explicit
``numpy.random.Generator`` so augmentation is reproducible whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(
    img: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
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


def color_jitter(img: np.ndarray, strength: Sequence[float], p: float, rng: np.random.Generator) -> np.ndarray:
    """torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p)`` on a uint8 HxWx3 image, drawn from ``rng``.

    With probability ``p``: brightness, contrast and saturation factors uniform in
    ``[max(0, 1 - v), 1 + v]``, a hue shift uniform in ``[-h, h]``, applied in a random order with
    torchvision's PIL functional ops (what AEFT's ``VOC12ClsDataset_SelfSup`` does). A zero strength
    skips that adjustment, as in torchvision.
    """
    if rng.random() >= p:
        return img
    from torchvision.transforms import functional as TF

    b, c, s, h = (float(v) for v in strength)
    factors = [
        float(rng.uniform(max(0.0, 1.0 - b), 1.0 + b)) if b > 0 else None,
        float(rng.uniform(max(0.0, 1.0 - c), 1.0 + c)) if c > 0 else None,
        float(rng.uniform(max(0.0, 1.0 - s), 1.0 + s)) if s > 0 else None,
        float(rng.uniform(-h, h)) if h > 0 else None,
    ]
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    pil = Image.fromarray(np.ascontiguousarray(img))
    for i in rng.permutation(4):
        if factors[i] is not None:
            pil = ops[i](pil, factors[i])
    return np.asarray(pil)


@dataclass(frozen=True)
class TrainTransform:
    """The IRN classification-training transform; all numbers from config.

    ``color_jitter`` = (brightness, contrast, saturation, hue) strengths applied with probability
    ``color_jitter_p`` after the flip (AEFT: (0.4, 0.4, 0.4, 0.1), p = 0.8); ``None`` (default)
    disables it and draws no random numbers, so other recipes are unchanged.
    """

    resize_long: Tuple[int, int] = (320, 640)
    crop_size: int = 512
    hflip: bool = True
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    color_jitter: Optional[Tuple[float, float, float, float]] = None
    color_jitter_p: float = 0.8

    def __post_init__(self):
        if self.color_jitter is not None:
            cj = tuple(float(v) for v in self.color_jitter)
            if len(cj) != 4 or any(v < 0 for v in cj) or cj[3] > 0.5:
                raise ValueError(
                    "color_jitter must be four non-negative strengths (brightness, contrast, saturation, hue) "
                    f"with hue <= 0.5, got {self.color_jitter!r}"
                )
            object.__setattr__(self, "color_jitter", cj)
        if not 0.0 <= self.color_jitter_p <= 1.0:
            raise ValueError(f"color_jitter_p must lie in [0, 1], got {self.color_jitter_p!r}")

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.with_saliency(img, None, rng)[0]

    def with_saliency(
        self, img: np.ndarray, saliency: Optional[np.ndarray], rng: np.random.Generator
    ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The image transform plus the same geometry on a saliency map (EPS's
        ``transform_with_mask``): ``saliency`` uint8 ``HxW`` (or ``HxWx3``, averaged over channels
        as the official loader) of the image's size; returns ``(3xHxW image, 1xHxW float32 saliency
        in [0, 1] or None)``. Same long-side resize (bicubic, as the official code), flip and crop
        (zero padding) as the image, no colour jitter; the random numbers drawn are those of
        :meth:`__call__`, so the image is the same with and without a saliency map."""
        if saliency is not None and saliency.shape[:2] != img.shape[:2]:
            raise ValueError(f"saliency map of size {saliency.shape[:2]} for an image of size {img.shape[:2]}")
        lo, hi = self.resize_long
        long_side = int(rng.integers(lo, hi + 1))
        img = resize_long(img, long_side)
        if saliency is not None:
            saliency = resize_long(saliency, long_side)
        if self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
            if saliency is not None:
                saliency = saliency[:, ::-1]
        if self.color_jitter is not None:
            img = color_jitter(img, self.color_jitter, self.color_jitter_p, rng)
        x = normalize(img, self.mean, self.std)
        if saliency is None:
            (x,) = random_crop([x], self.crop_size, rng, pad_values=[0.0])
            return np.ascontiguousarray(x.transpose(2, 0, 1)), None
        s = saliency.astype(np.float32) / 255.0
        if s.ndim == 3:
            s = s.mean(axis=2)
        x, s = random_crop([x, s], self.crop_size, rng, pad_values=[0.0, 0.0])
        return np.ascontiguousarray(x.transpose(2, 0, 1)), np.ascontiguousarray(s[None])


def rgb_to_hsv_u8(img: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit ``COLOR_RGB2HSV``: H in [0, 180) (degrees / 2), S and V in [0, 255], each
    rounded to the nearest integer (OpenCV rounds fixed-point; the two agree but for rare ties)."""
    x = img.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    diff = v - x.min(-1)
    safe = np.where(diff > 0, diff, 1.0)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)) * 30.0
    h = np.where(diff > 0, h, 0.0)
    h = np.where(h < 0, h + 180.0, h)
    s = np.where(v > 0, 255.0 * diff / np.where(v > 0, v, 1.0), 0.0)
    out = np.stack([np.floor(h + 0.5) % 180, np.floor(s + 0.5), v], -1)
    return out.astype(np.uint8)


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit ``COLOR_HSV2RGB`` (H in [0, 180)) in float32: hue x 6/180 split into sector
    and fraction, S and V scaled by 1/255, the sector's (v, t, p) / (q, v, p) / ... triple, x 255
    truncated. Agrees with OpenCV 5.1 to one grey level (on ~5 % of random values it is one lower
    or higher; OpenCV's 8-bit path rounds in fixed point)."""
    f32 = np.float32
    x = hsv.astype(f32)
    h = x[..., 0] * f32(6.0 / 180.0)
    s, v = x[..., 1] * f32(1.0 / 255.0), x[..., 2] * f32(1.0 / 255.0)
    sector = np.floor(h)
    f = h - sector
    i = sector.astype(np.int64) % 6
    one = f32(1.0)
    p, q, t = v * (one - s), v * (one - s * f), v * (one - s * (one - f))
    table = np.stack(
        [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0
    )  # 6 sectors x ... x 3
    rgb = np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]
    return np.clip(np.floor(rgb * f32(255.0)), 0, 255).astype(np.uint8)


def hsv_jitter(img: np.ndarray, ranges: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """SEAM's ``RandomHSV(h_r, s_r, v_r)`` (YudeWang/SEAM and arvijj/hfpl ``lib/datasets/transform.py``,
    DeepLab training on VOC: 10, 10, 10): integer shifts drawn uniformly from ``[-r, r]`` of the
    8-bit OpenCV HSV channels, hue modulo 180, saturation and value clipped to [0, 255]."""
    hr, sr, vr = (int(r) for r in ranges)
    dh, ds, dv = (int(rng.integers(-r, r + 1)) for r in (hr, sr, vr))
    hsv = rgb_to_hsv_u8(img).astype(np.int64)
    hsv[..., 0] = (hsv[..., 0] + dh) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + ds, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] + dv, 0, 255)
    return hsv_to_rgb_u8(hsv.astype(np.uint8))


def multiscale_views(img: np.ndarray, scales: Sequence[float], flip: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """For each scale, a ``2x3xhxw`` (or ``1x3xhxw`` without flip) float32 array: image and its flip."""
    views = []
    for s in scales:
        im = img if s == 1.0 else rescale(img, s)
        x = normalize(im, mean, std).transpose(2, 0, 1)
        views.append(np.ascontiguousarray(np.stack([x, x[:, :, ::-1]]) if flip else x[None]))
    return views
