"""CAM seeds: label maps from CAMs with a constant background score, and the threshold sweep.

A seed is ``argmax([t, cam_1, ..., cam_K])`` over the image's present classes, mapped back to label
ids (IRN ``step/eval_cam.py``; docs/official_code.md). The sweep evaluates every threshold of the
configured grid with the metrics module on one split; the best mIoU is marked ``chosen_with_gt``
because it is chosen with ground truth (an oracle choice, as in the literature; it is labelled, not
hidden).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
from tqdm import tqdm

from .cams import CamStore
from .csvio import read_csv_checked
from .data.base import SegDataset
from .io import DataError, atomic_path
from .metrics import ConfusionMatrix


def cam_to_label(high_res: np.ndarray, keys: np.ndarray, bg_threshold: float) -> np.ndarray:
    """``K x H x W`` maps of classes ``keys`` (0-based foreground) -> uint8 label map (0 = bg)."""
    h, w = high_res.shape[1:]
    if len(keys) == 0:
        return np.zeros((h, w), np.uint8)
    scores = np.concatenate([np.full((1, h, w), bg_threshold, np.float32), high_res.astype(np.float32)])
    lut = np.concatenate([[0], np.asarray(keys, np.int64) + 1]).astype(np.uint8)
    return lut[scores.argmax(0)]


def sweep_thresholds(
    store: CamStore, ds: SegDataset, ids: Sequence[str], thresholds: Sequence[float], progress: bool = True
) -> Dict[float, ConfusionMatrix]:
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
        rows.append(
            {
                "threshold": t,
                "split": split,
                **{k: v for k, v in s.items() if not k.startswith(("precision.", "recall."))},
            }
        )
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


#: columns of a threshold sweep that readers use; none may be empty
SWEEP_COLUMNS = ("threshold", "miou", "chosen_with_gt")


def read_sweep(path: Union[str, os.PathLike]) -> pd.DataFrame:
    """Read a threshold sweep CSV (:func:`write_table`), checked by :func:`~wsss.csvio.read_csv_checked`.

    A missing, empty, header-only or cut file, or one without the columns of :data:`SWEEP_COLUMNS`
    or with an empty value in them, raises :class:`DataError` naming the file.
    """
    return read_csv_checked(path, SWEEP_COLUMNS, nonnull=SWEEP_COLUMNS, what="threshold sweep")


def sweep_chosen_row(
    df: pd.DataFrame, source: Union[str, os.PathLike, None] = None, thresholds: Optional[Sequence[float]] = None
) -> pd.Series:
    """The row of the sweep ``df`` marked ``chosen_with_gt``, after checking the table is whole.

    Checks: at least one row; the columns of :data:`SWEEP_COLUMNS` present and filled;
    ``chosen_with_gt`` all True/False with exactly one True, on a row of the highest mIoU; one row
    per threshold (no threshold twice, and exactly the grid ``thresholds`` when given); the last
    column filled on every row (a row cut short has no value there). ``source`` (the file the
    table was read from) is named in the :class:`DataError` raised otherwise.
    """
    where = f"threshold sweep {source}" if source is not None else "threshold sweep (a table passed in, file not known)"
    if len(df) == 0:
        raise DataError(f"{where} has no rows")
    missing = [c for c in SWEEP_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{where} has no column(s) {missing}; its columns are {list(df.columns)}")
    for c in dict.fromkeys([*SWEEP_COLUMNS, df.columns[-1]]):
        empty = df[c].isna().to_numpy()
        if empty.any():
            raise DataError(
                f"{where}: column {c!r} is empty on data row(s) {[int(i) + 1 for i in empty.nonzero()[0][:5]]} "
                "(a cut or damaged file?)"
            )
    chosen = df["chosen_with_gt"]
    if not pd.api.types.is_bool_dtype(chosen):
        bad = sorted({str(v) for v in chosen if not isinstance(v, (bool, np.bool_))})
        raise DataError(f"{where}: column 'chosen_with_gt' must hold True/False only, found {bad[:5]}")
    try:
        t = df["threshold"].astype(float)
        miou = df["miou"].astype(float)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: columns 'threshold' and 'miou' must be numbers ({e})") from e
    dup = sorted(set(t[t.duplicated()]))
    if dup:
        raise DataError(f"{where} has more than one row for threshold(s) {dup}; expected one row per threshold")
    if thresholds is not None:
        want, have = sorted(float(x) for x in thresholds), sorted(t)
        if len(want) != len(have) or not np.allclose(want, have, rtol=1e-5, atol=1e-8):
            raise DataError(f"{where} has thresholds {have}; expected one row for each of {want}")
    n = int(chosen.sum())
    if n != 1:
        raise DataError(f"{where} has {n} rows marked chosen_with_gt; expected exactly one")
    row = df[chosen.to_numpy()].iloc[0]
    if float(row["miou"]) < miou.max():
        raise DataError(
            f"{where}: the row marked chosen_with_gt (threshold {float(row['threshold'])}, mIoU "
            f"{float(row['miou'])}) is not the one of the highest mIoU ({miou.max()})"
        )
    return row


def chosen_threshold(
    sweep: Union[pd.DataFrame, str, os.PathLike],
    source: Union[str, os.PathLike, None] = None,
    thresholds: Optional[Sequence[float]] = None,
) -> float:
    """The background threshold marked ``chosen_with_gt`` in a sweep (a table, or the path of its CSV).

    Given a path, the file is read with :func:`read_sweep` (so a cut file or a missing column is a
    :class:`DataError` naming it); a table is checked by :func:`sweep_chosen_row`.
    """
    if isinstance(sweep, (str, os.PathLike)):
        source = sweep if source is None else source
        sweep = read_sweep(sweep)
    return float(sweep_chosen_row(sweep, source, thresholds)["threshold"])
