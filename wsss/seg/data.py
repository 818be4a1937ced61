"""Training pairs of the segmentation stage: image + pseudo-mask (+ confidence mask), augmented.

* Pseudo-masks are single-channel PNGs ``<mask_dir>/<id>.png`` (class indices, 255 = ignore),
  as the seeds / CRF / IRN stages write them. ``gt=True`` trains on the dataset's ground-truth
  masks instead (the fully supervised upper bound).
* Confidence masks (``KTSE:irn/gen_mask.py``, BECO ``irn_mask``) are PNGs ``<conf_dir>/<id>.png`` with
  0 (unconfident) / 255 (confident); grayscale, RGB (torchvision ``save_image`` writes 3 channels)
  and 1-bit files are accepted, a pixel is confident when its (first-channel) value is >= 128
  (BECO reads them with PIL ``convert('1')``, the same for 0/255 files). **Unconfident pixels
  become 255 (ignore) in the target**: with one network this is what BECO's weighting
  ``CE * m`` does for ``m`` in {0, 1}; BECO's co-training term on those pixels needs the second
  network and is not part of this stage (see docs/deeplab.md). Whether the loss is averaged over
  the remaining pixels or over all pixels is the loss option ``ce_normalisation``.
* Augmentation (all numbers are parameters, :class:`SegTrainTransform`):

  - ``augment="resized_crop"`` (BECO ``RandomResizedCropMask``, ``transform.py``): torchvision
    RandomResizedCrop logic - crop area ~ U(scale_range) x image area, aspect ratio log-uniform
    in ``ratio_range``, up to ``attempts`` tries, else a centre crop clamped to the ratio range -
    then resized to ``crop_size x crop_size`` (image bilinear, label nearest). BECO's list
    ``[0.5, 0.75, 1, 1.5, 1.75, 2.0]`` acts as ``scale_range = (0.5, 0.75)`` (only the first two
    entries are used).
  - ``augment="scale_crop"`` (DeepLab-v2 recipe): random scale factor ~ U(scale_range) (image
    bilinear, label nearest), then a ``crop_size`` crop; an image smaller than the crop is
    placed at a random offset on a canvas padded with the mean colour (0 after normalisation)
    and label 255.

  Both end with a horizontal flip with probability 0.5 (``hflip``) and ImageNet normalisation.
* Randomness comes from :func:`wsss.data.classification.sample_rng` ``(seed, epoch, index)``, so
  results do not depend on the number of workers and a resumed run repeats an interrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.base import SegDataset
from ..data.classification import sample_rng
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, hsv_jitter, normalize, random_crop, resize
from ..io import DataError, read_label_png
from .params import AUGMENTS

IGNORE = 255


def read_confidence_png(path: Path) -> np.ndarray:
    """Boolean confidence map from a 0/255 PNG (any of 1-bit, L, P, RGB, RGBA); True = confident."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"confidence mask not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode == "1":
                arr = np.asarray(im, dtype=bool)
                return arr
            if im.mode == "P":
                im = im.convert("RGB")
            arr = np.asarray(im)
    except Exception as e:
        raise DataError(f"cannot read confidence mask {path}: {e}") from e
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"confidence mask {path} has shape {arr.shape}; expected a 2-D (or RGB) image")
    return arr >= 128


def apply_confidence(label: np.ndarray, confident: np.ndarray) -> np.ndarray:
    """Unconfident pixels of ``label`` become 255 (ignore)."""
    return np.where(confident, label, np.uint8(IGNORE)).astype(np.uint8)


def resized_crop_box(
    h: int,
    w: int,
    area_range: Tuple[float, float],
    ratio_range: Tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> Tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a RandomResizedCrop window (torchvision's sampling rule)."""
    area = h * w
    log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
    for _ in range(attempts):
        target = area * rng.uniform(area_range[0], area_range[1])
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < ratio_range[0]:
        cw, ch = w, int(round(w / ratio_range[0]))
    elif in_ratio > ratio_range[1]:
        ch, cw = h, int(round(h * ratio_range[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclass(frozen=True)
class SegTrainTransform:
    """Augmentation of (image uint8 HxWx3, label uint8 HxW) pairs; see the module docstring."""

    augment: str = "resized_crop"
    crop_size: int = 512
    scale_range: Tuple[float, float] = (0.5, 0.75)
    ratio_range: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    attempts: int = 10
    hflip: bool = True
    hsv_jitter: Optional[Tuple[int, int, int]] = None
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.hsv_jitter is not None and (
            len(self.hsv_jitter) != 3 or any(isinstance(r, bool) or int(r) != r or r < 0 for r in self.hsv_jitter)
        ):
            raise ValueError(
                f"hsv_jitter must be three integers >= 0 (hue, saturation, value), got {self.hsv_jitter!r}"
            )
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {self.scale_range!r}")
        if self.augment == "resized_crop" and hi > 1:
            raise ValueError(
                f"scale_range is an area fraction for augment='resized_crop' and must be <= 1, got {self.scale_range!r}"
            )
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < min <= max, got {self.ratio_range!r}")
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {self.crop_size!r}")

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """Returns the normalised image ``3 x S x S`` float32 and the label ``S x S`` uint8."""
        s = self.crop_size
        if self.hsv_jitter is not None:  # SEAM's loader: the HSV shift comes first
            img = hsv_jitter(img, self.hsv_jitter, rng)
        if self.augment == "resized_crop":
            top, left, ch, cw = resized_crop_box(
                img.shape[0], img.shape[1], self.scale_range, self.ratio_range, rng, self.attempts
            )
            img = resize(np.ascontiguousarray(img[top : top + ch, left : left + cw]), (s, s), Image.BILINEAR)
            label = resize(np.ascontiguousarray(label[top : top + ch, left : left + cw]), (s, s), Image.NEAREST)
            flip = self.hflip and rng.random() < 0.5
            x = normalize(img, self.mean, self.std)
        else:
            f = float(rng.uniform(self.scale_range[0], self.scale_range[1]))
            h, w = img.shape[:2]
            size = (max(1, int(round(h * f))), max(1, int(round(w * f))))
            img = resize(img, size, Image.BILINEAR)
            label = resize(label, size, Image.NEAREST)
            flip = self.hflip and rng.random() < 0.5
            x = normalize(img, self.mean, self.std)
            x, label = random_crop([x, label], s, rng, pad_values=[0.0, IGNORE])
        if flip:
            x, label = x[:, ::-1], label[:, ::-1]
        return np.ascontiguousarray(x.transpose(2, 0, 1)), np.ascontiguousarray(label)


def transform_from_params(params: Dict) -> SegTrainTransform:
    """:class:`SegTrainTransform` from a ``deeplab`` config section (keys named as the fields)."""
    return SegTrainTransform(
        augment=params["augment"],
        crop_size=int(params["crop_size"]),
        scale_range=tuple(float(v) for v in params["scale_range"]),
        ratio_range=tuple(float(v) for v in params["ratio_range"]),
        hflip=bool(params["hflip"]),
        hsv_jitter=None if params["hsv_jitter"] is None else tuple(int(v) for v in params["hsv_jitter"]),
    )


class SegTrainSet(Dataset):
    """(image, target) training pairs; call :meth:`set_epoch` before each epoch.

    ``mask_dir``: folder of pseudo-mask PNGs (required unless ``gt``); ``conf_dir``: optional folder
    of confidence PNGs; ``gt=True``: the dataset's ground truth instead of pseudo-masks (a
    ``mask_dir`` given with it is an error, so a wiring mistake cannot go unnoticed).
    Items: ``image`` (3xSxS float32), ``mask`` (SxS int64, 255 = ignore), ``index``, ``id``.
    """

    def __init__(
        self,
        ds: SegDataset,
        ids: Sequence[str],
        transform: SegTrainTransform,
        mask_dir: Optional[Path] = None,
        conf_dir: Optional[Path] = None,
        gt: bool = False,
        seed: int = 0,
    ):
        if gt and mask_dir is not None:
            raise ValueError(f"gt=True trains on the ground truth; got a pseudo-mask folder too ({mask_dir})")
        if not gt and mask_dir is None:
            raise ValueError("a pseudo-mask folder (mask_dir) is needed unless gt=True")
        self.ds, self.ids, self.transform = ds, list(ids), transform
        self.mask_dir = None if mask_dir is None else Path(mask_dir)
        self.conf_dir = None if conf_dir is None else Path(conf_dir)
        self.gt, self.seed, self.epoch = bool(gt), int(seed), 0
        if not self.ids:
            raise DataError("the segmentation training list is empty")
        for d, what in ((self.mask_dir, "pseudo-mask"), (self.conf_dir, "confidence-mask")):
            if d is not None and not d.is_dir():
                raise DataError(f"{what} folder not found: {d}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def mask_path(self, image_id: str) -> Path:
        return self.ds.mask_path(image_id) if self.gt else self.mask_dir / f"{image_id}.png"

    def load_target(self, image_id: str, image_shape: Tuple[int, int]) -> np.ndarray:
        """The un-augmented target of one image (confidence applied), checked against the image."""
        if self.gt:
            label = self.ds.load_mask(image_id)
        else:
            path = self.mask_path(image_id)
            label = read_label_png(path)
            bad = (label >= self.ds.num_classes) & (label != IGNORE)
            if bad.any():
                raise DataError(
                    f"pseudo-mask {path} has class index {int(label[bad].max())} >= {self.ds.num_classes} classes"
                )
        if label.shape != tuple(image_shape):
            raise DataError(
                f"mask {self.mask_path(image_id)} is {label.shape[1]}x{label.shape[0]} but its image is {image_shape[1]}x{image_shape[0]}"
            )
        if self.conf_dir is not None:
            cpath = self.conf_dir / f"{image_id}.png"
            conf = read_confidence_png(cpath)
            if conf.shape != label.shape:
                raise DataError(
                    f"confidence mask {cpath} is {conf.shape[1]}x{conf.shape[0]} but its image is {label.shape[1]}x{label.shape[0]}"
                )
            label = apply_confidence(label, conf)
        return label

    def __getitem__(self, index: int) -> Dict[str, object]:
        image_id = self.ids[index]
        img = self.ds.load_image(image_id)
        label = self.load_target(image_id, img.shape[:2])
        x, y = self.transform(img, label, sample_rng(self.seed, self.epoch, index))
        return {
            "image": torch.from_numpy(x),
            "mask": torch.from_numpy(y.astype(np.int64)),
            "index": index,
            "id": image_id,
        }
