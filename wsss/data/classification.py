"""Torch datasets of the classifier stages: training crops with labels, multi-scale inference views."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import DataError, read_image
from .base import SegDataset
from .transforms import TrainTransform, multiscale_views

log = logging.getLogger(__name__)


def select_labelled(ids: Sequence[str], labels: Mapping[str, np.ndarray], on_unlabelled: str) -> List[str]:
    """Drop or refuse images whose image-level label vector is empty.

    ``on_unlabelled``: ``"error"`` raises a :class:`DataError` naming the images (VOC and the
    synthetic data always have a label), ``"skip"`` drops them (COCO has unlabelled images;
    IRN/BECO skip them).
    """
    missing = [i for i in ids if i not in labels]
    if missing:
        raise DataError(f"{len(missing)} image(s) have no entry in the labels file, e.g. {missing[:5]}")
    empty = [i for i in ids if float(np.asarray(labels[i]).sum()) == 0.0]
    if empty and on_unlabelled == "error":
        raise DataError(
            f"{len(empty)} image(s) have no image-level label (empty label list), e.g. {empty[:5]}; "
            "set classifier.on_unlabelled: skip to leave them out"
        )
    if empty:
        log.warning("skipping %d image(s) with no image-level label", len(empty))
    keep = set(ids) - set(empty)
    return [i for i in ids if i in keep]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Augmentation RNG of one sample: a function of (seed, epoch, index) only, so results do not
    depend on the number of DataLoader workers and a resumed run repeats an interrupted one."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def saliency_path(saliency_dir: str | Path, image_id: str) -> Path:
    """The saliency map of an image: ``<saliency_dir>/<id>.png`` (EPS ``get_saliency_path``)."""
    return Path(saliency_dir) / f"{image_id}.png"


def read_saliency(path: str | Path) -> np.ndarray:
    """A saliency map as uint8 ``HxW`` (grey or equal channels) or ``HxWx3`` (averaged later, as
    EPS's loader); a missing file raises :class:`DataError` naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"saliency map not found: {path} (the method trains on saliency maps; set saliency.root to the "
            "folder of <image id>.png maps, or regenerate the synthetic dataset, which writes SALImages/)"
        )
    rgb = read_image(path)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0])
    return rgb


class ClassificationTrainSet(Dataset):
    """Random crops with multi-hot labels; call :meth:`set_epoch` before each epoch.

    ``saliency_dir`` (methods with ``needs_saliency``, EPS): each sample also carries ``saliency``,
    the image's ``<saliency_dir>/<id>.png`` under the same resize, flip and crop (``1xHxW`` float32
    in [0, 1], :meth:`TrainTransform.with_saliency`); ``None`` reads no saliency map.
    """

    def __init__(self, ds: SegDataset, ids: Sequence[str], labels: Mapping[str, np.ndarray], transform: TrainTransform, seed: int = 0,
                 saliency_dir: Optional[str | Path] = None):
        self.ds, self.ids, self.labels, self.transform, self.seed = ds, list(ids), labels, transform, seed
        self.saliency_dir = Path(saliency_dir) if saliency_dir is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, object]:
        image_id = self.ids[index]
        img = self.ds.load_image(image_id)
        rng = sample_rng(self.seed, self.epoch, index)
        if self.saliency_dir is None:
            x, sal = self.transform(img, rng), None
        else:
            path = saliency_path(self.saliency_dir, image_id)
            try:
                x, sal = self.transform.with_saliency(img, read_saliency(path), rng)
            except ValueError as e:
                raise DataError(f"saliency map {path}: {e}") from e
        out = {
            "image": torch.from_numpy(x),
            "label": torch.as_tensor(np.asarray(self.labels[image_id], dtype=np.float32)),
            "index": index,
            "id": image_id,
        }
        if sal is not None:
            out["saliency"] = torch.from_numpy(sal)
        return out


class MultiScaleSet(Dataset):
    """Multi-scale (+ flip) views of each image for CAM inference (IRN ``VOC12ClassificationDatasetMSF``)."""

    def __init__(self, ds: SegDataset, ids: Sequence[str], labels: Mapping[str, np.ndarray], scales: Sequence[float], flip: bool = True):
        self.ds, self.ids, self.labels, self.scales, self.flip = ds, list(ids), labels, list(scales), flip

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, object]:
        image_id = self.ids[index]
        img = self.ds.load_image(image_id)
        return {
            "id": image_id,
            "size": img.shape[:2],
            "views": [torch.from_numpy(v) for v in multiscale_views(img, self.scales, self.flip)],
            "label": np.asarray(self.labels[image_id], dtype=np.float32),
        }


def identity_collate(batch):
    """Batches of variable-size multi-scale views stay lists of samples."""
    return batch
