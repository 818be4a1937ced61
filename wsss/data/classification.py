"""Torch datasets of the classifier stages: training crops with labels, multi-scale inference views."""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import DataError
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


class ClassificationTrainSet(Dataset):
    """Random crops with multi-hot labels; call :meth:`set_epoch` before each epoch."""

    def __init__(self, ds: SegDataset, ids: Sequence[str], labels: Mapping[str, np.ndarray], transform: TrainTransform, seed: int = 0):
        self.ds, self.ids, self.labels, self.transform, self.seed = ds, list(ids), labels, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, object]:
        image_id = self.ids[index]
        img = self.ds.load_image(image_id)
        x = self.transform(img, sample_rng(self.seed, self.epoch, index))
        return {
            "image": torch.from_numpy(x),
            "label": torch.as_tensor(np.asarray(self.labels[image_id], dtype=np.float32)),
            "index": index,
            "id": image_id,
        }


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
