"""CAM seeds: label maps from CAMs with a constant background score, and the threshold sweep.

A seed is ``argmax([t, cam_1, ..., cam_K])`` over the image's present classes, mapped back to label
ids (IRN ``eval_cam``, irn_deeplab.md §1.4). The sweep evaluates every threshold of the configured
grid with the metrics module on one split; the best mIoU is marked ``chosen_with_gt`` because it is
chosen with ground truth (an oracle choice, as in the literature; it is labelled, not hidden).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from .cams import CamStore
from .data.base import SegDataset
from .io import atomic_path
from .metrics import ConfusionMatrix


def cam_to_label(high_res: np.ndarray, keys: np.ndarray, bg_threshold: float) -> np.ndarray:
    """``K x H x W`` maps of classes ``keys`` (0-based foreground) -> uint8 label map (0 = bg)."""
    h, w = high_res.shape[1:]
    if len(keys) == 0:
        return np.zeros((h, w), np.uint8)
    scores = np.concatenate([np.full((1, h, w), bg_threshold, np.float32), high_res.astype(np.float32)])
    lut = np.concatenate([[0], np.asarray(keys, np.int64) + 1]).astype(np.uint8)
    return lut[scores.argmax(0)]


def sweep_thresholds(store: CamStore, ds: SegDataset, ids: Sequence[str], thresholds: Sequence[float], progress: bool = True) -> Dict[float, ConfusionMatrix]:
    """Confusion matrices of the seeds of ``ids`` at every threshold (each CAM read once).

    The entry under key ``float("inf")`` is the all-background prediction (the reference any seed
    must beat)."""
    missing = [i for i in ids if i not in store]
    if missing:
        raise KeyError(f"{len(missing)} image(s) of the evaluation split have no CAM, e.g. {missing[:5]}")
    cms = {float(t): ConfusionMatrix(ds.num_classes) for t in list(thresholds) + [float("inf")]}
    for image_id in tqdm(ids, desc="seed sweep", disable=not progress, mininterval=2.0):
        rec = store.get(image_id, fields=("keys", "high_res"))
        gt = ds.load_mask(image_id)
        if gt.shape != rec.high_res.shape[1:]:
            raise ValueError(f"CAM of {image_id!r} has size {rec.high_res.shape[1:]}, ground truth {gt.shape}")
        for t, cm in cms.items():
            cm.update(gt, cam_to_label(rec.high_res, rec.keys, t))
    return cms


def sweep_table(cms: Dict[float, ConfusionMatrix], class_names: Sequence[str], split: str) -> pd.DataFrame:
    """One row per threshold: mIoU, precision, recall, per-class IoU; the best mIoU is marked."""
    rows: List[dict] = []
    reference = cms.get(float("inf"))
    for t, cm in sorted(cms.items()):
        if t == float("inf"):
            continue
        s = cm.summary(class_names)
        rows.append({"threshold": t, "split": split, **{k: v for k, v in s.items() if not k.startswith(("precision.", "recall."))}})
    df = pd.DataFrame(rows)
    best = int(df["miou"].idxmax())
    df["chosen_with_gt"] = False
    df.loc[best, "chosen_with_gt"] = True
    if reference is not None:
        df["all_background_miou"] = reference.miou
    return df


def write_table(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")


def chosen_threshold(df: pd.DataFrame) -> float:
    return float(df.loc[df["chosen_with_gt"], "threshold"].iloc[0])
