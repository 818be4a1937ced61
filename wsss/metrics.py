"""Segmentation metrics: the one module every evaluation uses (CAM seeds, CRF masks, IR labels,
random-walk labels, DeepLab predictions).

Two accumulators, both filled one image at a time, mergeable across shards:

* :class:`ConfusionMatrix` - region metrics (IoU, precision, recall, accuracy, coverage).
* :class:`BoundaryAccumulator` - DAVIS-style region similarity ``J`` and contour accuracy ``F``.

Conventions (read these before comparing numbers with a paper)
----------------------------------------------------------------

Label maps are integer arrays of the same shape; ``gt == ignore_index`` (255, the VOC void band)
is skipped everywhere. A ground-truth value outside ``[0, num_classes)`` other than the ignore
index is a data error and raises ``ValueError``.

A prediction outside ``[0, num_classes)`` (255 = "no prediction" in IR labels, or any other
value) is not a class. Such pixels are counted per gt class in ``ConfusionMatrix.unlabelled``,
never in the matrix itself.

The matrix is ``C[gt, pred]`` (int64), summed over the whole dataset (not averaged per image),
as in chainercv's ``calc_semantic_segmentation_confusion`` used by IRN's ``eval_cam`` and
``eval_sem_seg``. With ``tp_c = C[c, c]``, ``pred_c = sum_i C[i, c]`` and
``gt_c = sum_j C[c, j] + unlabelled[c]`` (every non-ignored gt pixel of class ``c``):

* ``iou_c = tp_c / (gt_c + pred_c - tp_c)``; NaN where the class is in neither gt nor pred.
  A pixel without a prediction therefore counts as a miss for its gt class, as in chainercv
  and ACR's ``evaluation_precision.py`` (whose gt totals include such pixels). With no
  unlabelled pixels (CAM seeds, CRF masks, DeepLab) it is the usual
  ``C_cc / (row_c + col_c - C_cc)``.
* ``precision_c = tp_c / pred_c`` (NaN if never predicted) and ``recall_c = tp_c / gt_c``
  (NaN if absent from gt). Precision only ever involves confident pixels.
* ``miou``, ``mean_precision`` and ``mean_recall`` are NaN-means over all classes, background
  included (IRN/chainercv convention; equal to ACR's plain mean when every class occurs).
* ``pixel_accuracy = sum tp / sum gt`` (unlabelled pixels count as wrong).
* ``coverage`` is the fraction of non-ignored gt pixels that got an in-range prediction.
  ``confident_pixel_accuracy`` is the accuracy over those pixels, i.e. the precision of the
  confident labels. ``iou(confident_only=True)``, ``recall(confident_only=True)`` and
  ``miou_confident`` leave unlabelled pixels out of ``gt_c`` altogether.

The boundary conventions are documented on :class:`BoundaryAccumulator`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .io import atomic_path

__all__ = [
    "ConfusionMatrix",
    "BoundaryAccumulator",
    "BoundaryScore",
    "boundary_map",
    "boundary_tolerance",
    "disk",
    "dilate_disk",
    "boundary_counts",
    "boundary_prf",
    "boundary_f_score",
    "evaluate_pairs",
    "write_metrics_csv",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _as_label_array(x: Any, name: str) -> np.ndarray:
    """Array of integer labels from a numpy array, a list or a torch tensor (moved to CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label map, got dtype {a.dtype}")
    return a


def _check_pair(gt: Any, pred: Any) -> Tuple[np.ndarray, np.ndarray]:
    gt = _as_label_array(gt, "gt")
    pred = _as_label_array(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred shapes differ: gt {gt.shape} vs pred {pred.shape}")
    return gt, pred


def _check_gt_range(g: np.ndarray, num_classes: int, ignore_index: Optional[int]) -> None:
    """Raise if a (non-ignored) gt value lies outside [0, num_classes)."""
    if g.size == 0:
        return
    lo_bad = np.issubdtype(g.dtype, np.signedinteger) and g.min() < 0
    if lo_bad or g.max() >= num_classes:
        bad = np.unique(g[(g < 0) | (g >= num_classes)])
        raise ValueError(
            f"gt has values {bad[:10].tolist()} outside [0, {num_classes}) that are not the ignore index {ignore_index}"
        )


def _pred_in_range(p: np.ndarray, num_classes: int) -> Optional[np.ndarray]:
    """Boolean mask of in-range predictions, or None if all of them are in range."""
    if p.size == 0:
        return None
    signed = np.issubdtype(p.dtype, np.signedinteger)
    if p.max() < num_classes and not (signed and p.min() < 0):
        return None
    inr = p < num_classes
    if signed:
        inr &= p >= 0
    return inr


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as float64 with NaN where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def _class_names(class_names: Optional[Sequence[str]], num_classes: int) -> List[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")
    if len(set(names)) != len(names):
        raise ValueError(f"class names are not unique: {names}")
    return names


# --------------------------------------------------------------------------------------------
# region metrics
# --------------------------------------------------------------------------------------------


class ConfusionMatrix:
    """Dataset-level confusion matrix ``C[gt, pred]`` (int64) plus out-of-range predictions.

    Attributes:
        mat: ``(C, C)`` int64, counts of (gt class, predicted class) over non-ignored pixels.
        unlabelled: ``(C,)`` int64, per gt class, non-ignored pixels whose prediction lies
            outside ``[0, C)`` (e.g. 255 in IR labels).
        ignored: number of pixels skipped because ``gt == ignore_index``.
        num_images: number of :meth:`update` calls.
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255):
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.mat = np.zeros((c, c), dtype=np.int64)
        self.unlabelled = np.zeros(c, dtype=np.int64)
        self.ignored = 0
        self.num_images = 0

    # -- accumulation -------------------------------------------------------------------------

    def update(self, gt: Any, pred: Any) -> "ConfusionMatrix":
        """Add one image (arrays of any shape, but the same shape). Returns ``self``."""
        gt, pred = _check_pair(gt, pred)
        c = self.num_classes
        g = gt.reshape(-1)
        p = pred.reshape(-1)
        # One bincount over a (C+1, C+1) grid, with no boolean indexing (slow for wide dtypes):
        # row C collects ignored gt pixels, column C out-of-range predictions.
        rows = g.astype(np.intp)
        n_ign = 0
        if self.ignore_index is not None:
            ign = g == self.ignore_index
            n_ign = int(np.count_nonzero(ign))
            if n_ign:
                np.copyto(rows, c, where=ign)
        if rows.size and (rows.min() < 0 or rows.max() > c):
            self._raise_bad_gt(g, ign if n_ign else None)
        inr = _pred_in_range(p, c)
        idx = rows
        idx *= c + 1
        # casting="unsafe" is safe here: every added value lies in [0, c]
        np.add(idx, p if inr is None else np.where(inr, p, c), out=idx, casting="unsafe")
        counts = np.bincount(idx, minlength=(c + 1) * (c + 1)).reshape(c + 1, c + 1)
        if counts[c].sum() != n_ign:  # a gt value equal to C that is not the ignore index
            self._raise_bad_gt(g, ign if n_ign else None)
        counts = counts[:c]
        self.ignored += n_ign
        self.mat += counts[:, :c]
        self.unlabelled += counts[:, c]
        self.num_images += 1
        return self

    def _raise_bad_gt(self, g: np.ndarray, ign: Optional[np.ndarray]) -> None:
        _check_gt_range(g if ign is None else g[~ign], self.num_classes, self.ignore_index)
        raise AssertionError("unreachable: gt range check passed on retry")  # pragma: no cover

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another shard's counts into this one (in place). Returns ``self``."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge {type(other).__name__} into ConfusionMatrix")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge confusion matrices with (num_classes, ignore_index) "
                f"{(self.num_classes, self.ignore_index)} and {(other.num_classes, other.ignore_index)}"
            )
        self.mat += other.mat
        self.unlabelled += other.unlabelled
        self.ignored += other.ignored
        self.num_images += other.num_images
        return self

    def copy(self) -> "ConfusionMatrix":
        new = ConfusionMatrix(self.num_classes, self.ignore_index)
        return new.merge(self)

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.copy().merge(other)

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfusionMatrix):
            return NotImplemented
        return (
            self.num_classes == other.num_classes
            and self.ignore_index == other.ignore_index
            and self.ignored == other.ignored
            and self.num_images == other.num_images
            and np.array_equal(self.mat, other.mat)
            and np.array_equal(self.unlabelled, other.unlabelled)
        )

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"images={self.num_images}, pixels={self.total_pixels})"
        )

    @classmethod
    def sum(cls, shards: Iterable["ConfusionMatrix"]) -> "ConfusionMatrix":
        """Merge an iterable of shards (at least one) into a new matrix."""
        it = iter(shards)
        try:
            total = next(it).copy()
        except StopIteration:
            raise ValueError("ConfusionMatrix.sum needs at least one shard") from None
        for s in it:
            total.merge(s)
        return total

    # -- counts -------------------------------------------------------------------------------

    @property
    def tp(self) -> np.ndarray:
        return np.diag(self.mat).copy()

    @property
    def gt_pixels(self) -> np.ndarray:
        """Per class: every non-ignored gt pixel (with or without an in-range prediction)."""
        return self.mat.sum(axis=1) + self.unlabelled

    @property
    def gt_pixels_confident(self) -> np.ndarray:
        """Per class: non-ignored gt pixels that received an in-range prediction."""
        return self.mat.sum(axis=1)

    @property
    def pred_pixels(self) -> np.ndarray:
        """Per class: pixels (with non-ignored gt) predicted as that class."""
        return self.mat.sum(axis=0)

    @property
    def total_pixels(self) -> int:
        """Non-ignored gt pixels."""
        return int(self.mat.sum() + self.unlabelled.sum())

    @property
    def labelled_pixels(self) -> int:
        """Non-ignored gt pixels with an in-range prediction."""
        return int(self.mat.sum())

    # -- per-class metrics ----------------------------------------------------------------------

    def iou(self, confident_only: bool = False) -> np.ndarray:
        """Per-class IoU; NaN for a class in neither gt nor pred (see module docstring)."""
        tp = self.tp
        gt = self.gt_pixels_confident if confident_only else self.gt_pixels
        return _div(tp, gt + self.pred_pixels - tp)

    def precision(self) -> np.ndarray:
        """Per-class ``tp / pred``; NaN for a class never predicted."""
        return _div(self.tp, self.pred_pixels)

    def recall(self, confident_only: bool = False) -> np.ndarray:
        """Per-class ``tp / gt``; NaN for a class absent from gt."""
        gt = self.gt_pixels_confident if confident_only else self.gt_pixels
        return _div(self.tp, gt)

    def class_coverage(self) -> np.ndarray:
        """Per gt class, fraction of its pixels with an in-range prediction."""
        return _div(self.gt_pixels_confident, self.gt_pixels)

    # -- scalar metrics -----------------------------------------------------------------------

    @property
    def miou(self) -> float:
        return _nanmean(self.iou())

    @property
    def miou_confident(self) -> float:
        return _nanmean(self.iou(confident_only=True))

    @property
    def mean_precision(self) -> float:
        return _nanmean(self.precision())

    @property
    def mean_recall(self) -> float:
        return _nanmean(self.recall())

    @property
    def pixel_accuracy(self) -> float:
        return float(_div(self.tp.sum(), self.total_pixels))

    @property
    def confident_pixel_accuracy(self) -> float:
        """Accuracy over pixels with an in-range prediction (precision of confident labels)."""
        return float(_div(self.tp.sum(), self.labelled_pixels))

    @property
    def coverage(self) -> float:
        """Fraction of non-ignored gt pixels with an in-range prediction."""
        return float(_div(self.labelled_pixels, self.total_pixels))

    def summary(self, class_names: Optional[Sequence[str]] = None, flat: bool = True) -> Dict[str, Any]:
        """Scalar metrics plus per-class IoU / precision / recall.

        With ``flat=True`` (default) every value is a scalar and per-class entries are named
        ``iou.<class>``, ``precision.<class>``, ``recall.<class>``: one CSV row. With
        ``flat=False`` the per-class values are dicts under ``iou``, ``precision``, ``recall``.
        Metrics are fractions in [0, 1] (not percent); NaN marks undefined values.
        """
        names = _class_names(class_names, self.num_classes)
        out: Dict[str, Any] = {
            "num_classes": self.num_classes,
            "num_images": int(self.num_images),
            "pixels": self.total_pixels,
            "ignored_pixels": int(self.ignored),
            "unlabelled_pixels": int(self.unlabelled.sum()),
            "miou": self.miou,
            "mean_precision": self.mean_precision,
            "mean_recall": self.mean_recall,
            "pixel_accuracy": self.pixel_accuracy,
            "coverage": self.coverage,
            "confident_pixel_accuracy": self.confident_pixel_accuracy,
            "miou_confident": self.miou_confident,
        }
        per_class = {"iou": self.iou(), "precision": self.precision(), "recall": self.recall()}
        for key, values in per_class.items():
            d = {n: float(v) for n, v in zip(names, values)}
            if flat:
                out.update({f"{key}.{n}": v for n, v in d.items()})
            else:
                out[key] = d
        return out

    def per_class_table(self, class_names: Optional[Sequence[str]] = None):
        """A pandas DataFrame with one row per class."""
        import pandas as pd

        names = _class_names(class_names, self.num_classes)
        return pd.DataFrame(
            {
                "class": names,
                "iou": self.iou(),
                "precision": self.precision(),
                "recall": self.recall(),
                "gt_pixels": self.gt_pixels,
                "pred_pixels": self.pred_pixels,
                "unlabelled_pixels": self.unlabelled.copy(),
                "coverage": self.class_coverage(),
                "iou_confident": self.iou(confident_only=True),
            }
        )


# --------------------------------------------------------------------------------------------
# boundary metrics (DAVIS)
# --------------------------------------------------------------------------------------------


def boundary_map(mask: Any) -> np.ndarray:
    """1-pixel-wide boundary of a binary mask (non-zero = foreground), as a bool array.

    Same definition as DAVIS/BSDS ``seg2bmap``: a pixel is a boundary pixel when its value differs
    from its right, lower or lower-right neighbour, comparing only with neighbours inside the image
    (so a mask edge lying on the image border is not a boundary, and the boundary sits half a pixel
    towards the origin from the true edge).
    """
    seg = np.asarray(mask)
    if seg.ndim != 2:
        raise ValueError(f"boundary_map needs a 2-D mask, got shape {seg.shape}")
    seg = seg.astype(bool, copy=False)
    b = np.zeros(seg.shape, dtype=bool)
    b[:, :-1] |= seg[:, :-1] ^ seg[:, 1:]
    b[:-1, :] |= seg[:-1, :] ^ seg[1:, :]
    b[:-1, :-1] |= seg[:-1, :-1] ^ seg[1:, 1:]
    return b


def boundary_tolerance(shape: Sequence[int], bound_th: float = 0.008) -> int:
    """Matching tolerance in pixels: ``ceil(bound_th * diagonal)`` if ``bound_th < 1``, else ``bound_th``.

    The diagonal is ``sqrt(H^2 + W^2)`` (DAVIS: ``np.linalg.norm(mask.shape)``); 0.008 gives 5 px
    for a 500x375 VOC image. A ``bound_th >= 1`` is a radius in pixels and must be a whole number.
    """
    if not bound_th >= 0:
        raise ValueError(f"bound_th must be >= 0, got {bound_th!r}")
    if bound_th >= 1:
        if float(bound_th) != int(bound_th):
            raise ValueError(f"bound_th >= 1 is a radius in pixels and must be a whole number, got {bound_th!r}")
        return int(bound_th)
    h, w = int(shape[-2]), int(shape[-1])
    return int(np.ceil(bound_th * np.linalg.norm([float(h), float(w)])))


def disk(radius: int) -> np.ndarray:
    """Disk structuring element: offsets (dy, dx) with ``dy^2 + dx^2 <= r^2`` (as skimage ``disk``)."""
    r = int(radius)
    if r < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    d = np.arange(-r, r + 1)
    return (d[:, None] ** 2 + d[None, :] ** 2) <= r * r


def dilate_disk(mask: Any, radius: int) -> np.ndarray:
    """Binary dilation of a 2-D mask by :func:`disk` ``(radius)``; outside the image counts as 0.

    Row decomposition: the disk is a stack of horizontal runs, so the result is the OR over
    ``dy`` of the mask dilated horizontally by the run's half-width, shifted by ``dy`` rows.
    About ``3 * radius`` vectorised ORs, no Python loop over pixels, no scipy/OpenCV.
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 2:
        raise ValueError(f"dilate_disk needs a 2-D mask, got shape {m.shape}")
    r = int(radius)
    if r < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if r == 0 or not m.any():
        return m.copy()
    half = [math.isqrt(r * r - dy * dy) for dy in range(r + 1)]
    needed = set(half)
    horiz: Dict[int, np.ndarray] = {}
    cur = m.copy()
    if 0 in needed:
        horiz[0] = cur.copy()
    for w in range(1, r + 1):
        cur[:, w:] |= m[:, :-w]
        cur[:, :-w] |= m[:, w:]
        if w in needed:
            horiz[w] = cur.copy()
    h = m.shape[0]
    out = horiz[half[0]].copy()
    for dy in range(1, min(r, h - 1) + 1):
        row = horiz[half[dy]]
        out[dy:] |= row[:-dy]
        out[:-dy] |= row[dy:]
    return out


def boundary_counts(pred_boundary: np.ndarray, gt_boundary: np.ndarray, tolerance: int) -> Tuple[int, int, int, int]:
    """Matches between two boundary maps: ``(pred_matched, gt_matched, n_pred, n_gt)``.

    A pred boundary pixel is matched when a gt boundary pixel lies within the disk of radius
    ``tolerance`` around it, and vice versa. Only the bounding box of both boundaries is
    dilated (exact, since matches only occur between pixels inside it).
    """
    pb = np.asarray(pred_boundary, dtype=bool)
    gb = np.asarray(gt_boundary, dtype=bool)
    if pb.shape != gb.shape:
        raise ValueError(f"boundary maps differ in shape: pred {pb.shape} vs gt {gb.shape}")
    n_pred, n_gt = int(np.count_nonzero(pb)), int(np.count_nonzero(gb))
    if n_pred == 0 or n_gt == 0:
        return 0, 0, n_pred, n_gt
    both = pb | gb
    rows = np.flatnonzero(both.any(axis=1))
    cols = np.flatnonzero(both.any(axis=0))
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    pb, gb = pb[sl], gb[sl]
    pred_matched = int(np.count_nonzero(pb & dilate_disk(gb, tolerance)))
    gt_matched = int(np.count_nonzero(gb & dilate_disk(pb, tolerance)))
    return pred_matched, gt_matched, n_pred, n_gt


class BoundaryScore(NamedTuple):
    f: float
    precision: float
    recall: float


def _prf_from_counts(pred_matched: float, gt_matched: float, n_pred: float, n_gt: float) -> BoundaryScore:
    """DAVIS conventions: both boundaries empty -> P = R = F = 1; exactly one empty -> F = 0."""
    if n_pred == 0 and n_gt == 0:
        return BoundaryScore(1.0, 1.0, 1.0)
    if n_pred == 0:
        return BoundaryScore(0.0, 1.0, 0.0)
    if n_gt == 0:
        return BoundaryScore(0.0, 0.0, 1.0)
    p = pred_matched / n_pred
    r = gt_matched / n_gt
    f = 0.0 if p + r == 0 else 2.0 * p * r / (p + r)
    return BoundaryScore(float(f), float(p), float(r))


def boundary_prf(pred_mask: Any, gt_mask: Any, bound_th: float = 0.008, void: Any = None) -> BoundaryScore:
    """Contour F-measure, precision and recall between two binary masks (DAVIS ``f_measure``).

    ``void`` (optional bool mask): those pixels are set to background in *both* masks before
    the boundaries are taken, as DAVIS does with its void pixels.
    """
    pm = np.asarray(pred_mask).astype(bool)
    gm = np.asarray(gt_mask).astype(bool)
    if pm.shape != gm.shape:
        raise ValueError(f"pred and gt masks differ in shape: pred {pm.shape} vs gt {gm.shape}")
    if void is not None:
        v = np.asarray(void, dtype=bool)
        if v.shape != gm.shape:
            raise ValueError(f"void mask shape {v.shape} differs from mask shape {gm.shape}")
        pm = pm & ~v
        gm = gm & ~v
    tol = boundary_tolerance(gm.shape, bound_th)
    return _prf_from_counts(*boundary_counts(boundary_map(pm), boundary_map(gm), tol))


def boundary_f_score(pred_mask: Any, gt_mask: Any, bound_th: float = 0.008, void: Any = None) -> float:
    """Contour F-measure between two binary masks; see :func:`boundary_prf`."""
    return boundary_prf(pred_mask, gt_mask, bound_th, void).f


class BoundaryAccumulator:
    """Region similarity ``J`` and contour accuracy ``F`` (DAVIS) for semantic label maps.

    Per image, for each class present in the gt or in the prediction (at non-void pixels; a
    prediction outside ``[0, C)`` is no class), the binary masks ``gt == c`` and ``pred == c``
    give one (image, class) pair with

    * ``J`` = IoU of the two masks over non-void pixels;
    * ``F`` = DAVIS contour F-measure of the two masks (:func:`boundary_prf`), with tolerance
      ``ceil(bound_th * image diagonal)`` pixels (5 px for 500x375 at the default 0.008).
      Either boundary empty follows DAVIS: both empty -> 1, one empty -> 0.

    Dataset scores:

    * ``J_mean``, ``F_mean``: means over all (image, class) pairs; ``JF = (J_mean + F_mean) / 2``.
    * ``J_class_mean``, ``F_class_mean``: mean over classes of each class's mean over its pairs
      (DAVIS averages per object first; here a class plays the object).
    * ``F_pooled_mean``: contour matches and boundary lengths summed per class over the whole
      dataset, one F per class, then the mean over the classes that occur. This is what HFPL's
      ``contour_fscore.py`` reports as "mean F-score" (HFPL also scores a class that never
      occurs as F = 1; here it is NaN and left out).

    ``void`` says what to do with gt pixels equal to ``ignore_index``:

    * ``"exclude"`` (default, DAVIS): they are set to background in *both* binary masks before
      boundaries are taken and are left out of ``J``;
    * ``"background"`` (HFPL's ``contour_fscore.py``): the gt void is relabelled background (0).

    ``include_background=False`` (default, as HFPL, which scores classes 1..C-1 only) skips
    class 0. For HFPL's number use ``void="background"`` and read ``F_pooled_mean``.
    """

    VOID_MODES = ("exclude", "background")

    def __init__(
        self,
        num_classes: int,
        ignore_index: Optional[int] = 255,
        bound_th: float = 0.008,
        include_background: bool = False,
        void: str = "exclude",
    ):
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if void not in self.VOID_MODES:
            raise ValueError(f"void must be one of {self.VOID_MODES}, got {void!r}")
        boundary_tolerance((1, 1), bound_th)  # validates bound_th
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.bound_th = float(bound_th)
        self.include_background = bool(include_background)
        self.void = void
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.pairs = np.zeros(c, dtype=np.int64)
        self.j_sum = np.zeros(c, dtype=np.float64)
        self.f_sum = np.zeros(c, dtype=np.float64)
        self.p_sum = np.zeros(c, dtype=np.float64)
        self.r_sum = np.zeros(c, dtype=np.float64)
        # pooled contour counts, per class: pred matched, gt matched, pred boundary, gt boundary
        self.pooled = np.zeros((c, 4), dtype=np.int64)
        self.num_images = 0

    def _settings(self) -> Tuple[Any, ...]:
        return (self.num_classes, self.ignore_index, self.bound_th, self.include_background, self.void)

    def update(self, gt: Any, pred: Any) -> List[Tuple[int, float, float]]:
        """Add one image (2-D label maps). Returns its ``(class, J, F)`` pairs."""
        gt, pred = _check_pair(gt, pred)
        if gt.ndim != 2:
            raise ValueError(f"boundary metrics need 2-D label maps, got shape {gt.shape}")
        c = self.num_classes
        void = None
        if self.ignore_index is not None:
            v = gt == self.ignore_index
            if v.any():
                if self.void == "background":
                    gt = np.where(v, 0, gt)
                else:
                    void = v
        g = gt if void is None else gt[~void]
        p = pred if void is None else pred[~void]
        g = g.reshape(-1)
        p = p.reshape(-1)
        _check_gt_range(g, c, self.ignore_index)
        inr = _pred_in_range(p, c)
        gt_cnt = np.bincount(g.astype(np.intp), minlength=c)
        p_in = p if inr is None else p[inr]
        pred_cnt = np.bincount(p_in.astype(np.intp), minlength=c)
        hit = g == p
        tp = np.bincount(g[hit].astype(np.intp), minlength=c)  # g in range => p in range where equal
        classes = np.flatnonzero(gt_cnt + pred_cnt)
        if not self.include_background:
            classes = classes[classes != 0]
        tol = boundary_tolerance(gt.shape, self.bound_th)
        keep = None if void is None else ~void
        results = []
        for k in classes:
            k = int(k)
            j = tp[k] / (gt_cnt[k] + pred_cnt[k] - tp[k])
            gm = gt == k
            pm = pred == k
            if keep is not None:
                gm &= keep
                pm &= keep
            counts = boundary_counts(boundary_map(pm), boundary_map(gm), tol)
            s = _prf_from_counts(*counts)
            self.pairs[k] += 1
            self.j_sum[k] += j
            self.f_sum[k] += s.f
            self.p_sum[k] += s.precision
            self.r_sum[k] += s.recall
            self.pooled[k] += counts
            results.append((k, float(j), s.f))
        self.num_images += 1
        return results

    def merge(self, other: "BoundaryAccumulator") -> "BoundaryAccumulator":
        if not isinstance(other, BoundaryAccumulator):
            raise TypeError(f"cannot merge {type(other).__name__} into BoundaryAccumulator")
        if other._settings() != self._settings():
            raise ValueError(
                f"cannot merge boundary accumulators with settings {self._settings()} and {other._settings()}"
            )
        self.pairs += other.pairs
        self.j_sum += other.j_sum
        self.f_sum += other.f_sum
        self.p_sum += other.p_sum
        self.r_sum += other.r_sum
        self.pooled += other.pooled
        self.num_images += other.num_images
        return self

    def copy(self) -> "BoundaryAccumulator":
        return BoundaryAccumulator(*self._settings()).merge(self)

    def __add__(self, other: "BoundaryAccumulator") -> "BoundaryAccumulator":
        return self.copy().merge(other)

    def __iadd__(self, other: "BoundaryAccumulator") -> "BoundaryAccumulator":
        return self.merge(other)

    # -- results ------------------------------------------------------------------------------

    def class_j(self) -> np.ndarray:
        """Per class, mean J over its (image, class) pairs; NaN if it has none."""
        return _div(self.j_sum, self.pairs)

    def class_f(self) -> np.ndarray:
        return _div(self.f_sum, self.pairs)

    def class_f_pooled(self) -> np.ndarray:
        """Per class, F from contour counts summed over the dataset (HFPL); NaN if no pairs."""
        out = np.full(self.num_classes, np.nan)
        for k in np.flatnonzero(self.pairs):
            out[k] = _prf_from_counts(*self.pooled[k]).f
        return out

    def summary(self, class_names: Optional[Sequence[str]] = None, flat: bool = True) -> Dict[str, Any]:
        """``J_mean``, ``F_mean``, ``JF`` and the variants documented on the class.

        Per-class entries are ``J.<class>``, ``F.<class>``, ``F_pooled.<class>`` (``flat=True``)
        or dicts under ``J``, ``F``, ``F_pooled``. Fractions in [0, 1]; NaN when undefined.
        """
        names = _class_names(class_names, self.num_classes)
        n = int(self.pairs.sum())
        j_mean = float(self.j_sum.sum() / n) if n else float("nan")
        f_mean = float(self.f_sum.sum() / n) if n else float("nan")
        out: Dict[str, Any] = {
            "num_images": int(self.num_images),
            "pairs": n,
            "bound_th": self.bound_th,
            "J_mean": j_mean,
            "F_mean": f_mean,
            "JF": (j_mean + f_mean) / 2.0,
            "contour_precision_mean": float(self.p_sum.sum() / n) if n else float("nan"),
            "contour_recall_mean": float(self.r_sum.sum() / n) if n else float("nan"),
            "J_class_mean": _nanmean(self.class_j()),
            "F_class_mean": _nanmean(self.class_f()),
            "F_pooled_mean": _nanmean(self.class_f_pooled()),
        }
        per_class = {"J": self.class_j(), "F": self.class_f(), "F_pooled": self.class_f_pooled()}
        for key, values in per_class.items():
            d = {nm: float(v) for nm, v in zip(names, values)}
            if flat:
                out.update({f"{key}.{nm}": v for nm, v in d.items()})
            else:
                out[key] = d
        return out


# --------------------------------------------------------------------------------------------
# drivers and output
# --------------------------------------------------------------------------------------------


def evaluate_pairs(
    pairs: Iterable[Tuple[Any, Any]],
    num_classes: int,
    ignore_index: Optional[int] = 255,
    with_boundary: bool = False,
    **boundary_kwargs: Any,
) -> Tuple[ConfusionMatrix, Optional[BoundaryAccumulator]]:
    """Consume ``(gt, pred)`` label maps; return ``(confusion_matrix, boundary_accumulator)``.

    The boundary accumulator is ``None`` unless ``with_boundary``; ``boundary_kwargs``
    (``bound_th``, ``include_background``, ``void``) go to :class:`BoundaryAccumulator`.
    """
    if boundary_kwargs and not with_boundary:
        raise ValueError(f"boundary options {sorted(boundary_kwargs)} given without with_boundary=True")
    cm = ConfusionMatrix(num_classes, ignore_index)
    ba = BoundaryAccumulator(num_classes, ignore_index, **boundary_kwargs) if with_boundary else None
    for gt, pred in pairs:
        gt, pred = _check_pair(gt, pred)
        cm.update(gt, pred)
        if ba is not None:
            ba.update(gt, pred)
    return cm, ba


def write_metrics_csv(path: Any, rows: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]) -> None:
    """Write one dict or a list of dicts as CSV (columns in first-seen order), atomically.

    Missing entries and NaN are written as ``nan``; floats keep full precision, so
    ``pandas.read_csv`` gives back the same numbers.
    """
    import pandas as pd

    if isinstance(rows, Mapping):
        rows = [rows]
    rows = list(rows)
    if not rows:
        raise ValueError("write_metrics_csv needs at least one row")
    columns: List[str] = []
    seen = set()
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                columns.append(k)
    for r in rows:
        bad = [k for k, v in r.items() if isinstance(v, (dict, list, tuple, np.ndarray))]
        if bad:
            raise ValueError(f"metrics row has non-scalar values for {bad}; use summary(flat=True)")
    df = pd.DataFrame(rows, columns=columns)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, na_rep="nan")
