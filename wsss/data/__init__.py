"""Datasets: readers (VOC 2012, COCO 2014, synthetic in the VOC layout), downloads, statistics."""

from __future__ import annotations

from typing import Any, List, Mapping

from .base import SegDataset


def open_dataset(cfg: Mapping[str, Any], labels_csv: str | None = None) -> SegDataset:
    """Open the dataset configured in ``cfg`` (a validated config) with its reader."""
    from ..config import dataset_root

    name = cfg["dataset"]["name"]
    root = dataset_root(cfg)
    if name in ("synthetic", "voc12"):
        from .voc import VOCDataset

        mask_dir = cfg["voc12"]["mask_dir"] if name == "voc12" else None
        return VOCDataset(root, mask_dir=mask_dir, labels_csv=labels_csv)
    if name == "coco14":
        from .coco import COCODataset

        return COCODataset(root)
    raise KeyError(f"unknown dataset {name!r}; valid names: coco14, synthetic, voc12")


def split_union(ds: SegDataset, splits: List[str]) -> List[str]:
    """Ids of several splits, each id once, in first-seen order."""
    seen: dict = {}
    for s in splits:
        for i in ds.ids(s):
            seen.setdefault(i, None)
    return list(seen)
