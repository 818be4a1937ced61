"""Scoring of the segmentation network's prediction PNGs (KTSE/BECO ``test.py``; the torch-free
half of :mod:`wsss.seg.evaluate`).

:func:`evaluate_predictions` reads the palette PNGs ``<pred_dir>/<id>.png``
(:func:`prediction_path`) back and scores them with :mod:`wsss.metrics` (mIoU, per-class IoU /
precision / recall, J&F with :class:`~wsss.metrics.BoundaryAccumulator`), writing a one-row metrics
CSV (with the package version and config hash), a per-class CSV and an image | ground truth |
prediction gallery. No torch: the ``eval_deeplab`` rule runs in the ``data`` conda env;
:mod:`wsss.seg.evaluate` (inference, torch) re-exports these names.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..config import config_hash
from ..data.base import SegDataset
from ..io import DataError, read_label_png, voc_palette
from ..metrics import BoundaryAccumulator, ConfusionMatrix, write_metrics_csv

log = logging.getLogger(__name__)

__all__ = ["prediction_path", "read_prediction", "evaluate_predictions", "write_gallery"]


def prediction_path(out_dir: str | Path, image_id: str) -> Path:
    return Path(out_dir) / f"{image_id}.png"


def read_prediction(pred_dir: str | Path, image_id: str, shape: Tuple[int, int]) -> np.ndarray:
    path = prediction_path(pred_dir, image_id)
    if not path.exists():
        raise DataError(f"prediction not found: {path} (did every predict shard finish?)")
    pred = read_label_png(path)
    if pred.shape != tuple(shape):
        raise DataError(
            f"prediction {path} is {pred.shape[1]}x{pred.shape[0]} but the ground truth is {shape[1]}x{shape[0]}"
        )
    return pred


def evaluate_predictions(
    ds: SegDataset,
    ids: Sequence[str],
    pred_dir: str | Path,
    metrics_csv: str | Path,
    per_class_csv: str | Path,
    *,
    resolved_config: Mapping[str, Any],
    split: str = "",
    gallery_png: str | Path | None = None,
    gallery_images: int = 8,
    bound_th: float = 0.008,
    extra: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Score the prediction PNGs of ``ids`` against the dataset's ground truth; returns the metrics row.

    The row holds ``ConfusionMatrix.summary()`` (mIoU, mean precision / recall, pixel accuracy and
    per-class ``iou.<c>``, ``precision.<c>``, ``recall.<c>``), the J&F scores of
    ``BoundaryAccumulator.summary()`` (``J_mean``, ``F_mean``, ``JF``, ... and per class), plus
    ``split``, ``package_version``, ``config_hash`` (of ``resolved_config``) and ``extra``.
    The per-class CSV has one row per class (IoU, precision, recall, pixel counts, J, F).
    """
    ids = list(ids)
    if not ids:
        raise DataError("no images to evaluate")
    names = list(ds.class_names)
    cm = ConfusionMatrix(ds.num_classes, ignore_index=255)
    ba = BoundaryAccumulator(ds.num_classes, ignore_index=255, bound_th=bound_th)
    for image_id in tqdm(ids, desc="evaluate", disable=not progress, mininterval=2.0):
        gt = ds.load_mask(image_id)
        pred = read_prediction(pred_dir, image_id, gt.shape)
        cm.update(gt, pred)
        ba.update(gt, pred)
    row: Dict[str, Any] = {"split": split, "package_version": __version__, "config_hash": config_hash(resolved_config)}
    row.update(dict(extra or {}))
    row.update(cm.summary(names))
    bsum = ba.summary(names)
    bsum.pop("num_images", None)
    row.update(bsum)
    write_metrics_csv(metrics_csv, row)

    table = cm.per_class_table(names)
    table["J"] = ba.class_j()
    table["F"] = ba.class_f()
    table["boundary_pairs"] = ba.pairs
    write_metrics_csv(per_class_csv, table.to_dict("records"))

    if gallery_png is not None:
        write_gallery(ds, ids, pred_dir, gallery_png, gallery_images)
    log.info("mIoU %.4f, J&F %.4f on %d images", row["miou"], row["JF"], len(ids))
    return row


def write_gallery(ds: SegDataset, ids: Sequence[str], pred_dir: str | Path, path: str | Path, n: int) -> None:
    """Rows of image | ground truth | prediction (VOC colours) for ``n`` images drawn with seed 0."""
    from ..viz import gallery

    palette = voc_palette()
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(ids), size=min(max(1, n), len(ids)), replace=False))
    rows: List[List[np.ndarray]] = []
    for i in pick:
        img, gt = ds.load_image(ids[i]), ds.load_mask(ids[i])
        pred = read_prediction(pred_dir, ids[i], gt.shape)
        rows.append([img, palette[gt], palette[pred]])
    gallery(rows, path, titles=["image", "ground truth", "prediction"], row_labels=[ids[i] for i in pick])
