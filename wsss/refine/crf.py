"""Dense-CRF post-processing (fully connected CRF, Krähenbühl & Koltun 2011, via ``pydensecrf``).

Three flavours, each with the reference defaults (docs/crf.md, "Flavours"):

* :func:`crf_with_alpha` — PSA "CRF with alpha" (AEFT/ACR/HFPL/SMAF/KTSE ``_crf_with_alpha``):
  background score ``(1 - max_c CAM) ** alpha`` stacked with the present classes' CAMs, unary
  ``-log(clip(p, 1e-5, 1))`` (``unary_from_softmax``; the stack is *not* renormalised, as in the
  reference), Gaussian sxy 3 compat 3, bilateral sxy 80 srgb 13 compat 10, 10 iterations.
* :func:`crf_inference_label` — IRN label CRF (``misc/imutils.crf_inference_label``, used twice per
  image by ``cam_to_ir_label`` and by SMAF's pseudo masks): hard labels, ``unary_from_labels(gt_prob
  0.7, zero_unsure=False)``, Gaussian 3/3, bilateral 50/5/10, 10 iterations, argmax.
* :func:`deeplab_crf` — DeepLab test-time CRF (KTSE/BECO ``segmentation/utils/crf.py::DenseCRF``,
  kazuto1011/deeplab-pytorch): softmax unary, Gaussian sxy 1 compat 3, bilateral sxy 67 srgb 3
  compat 4, 10 iterations, returns the refined probabilities.

Plus :func:`crf_seed_threshold` (constant background score, argmax, IRN label CRF — SMAF's
``gen_pseudo_mask`` with bg 0.20), the stage function :func:`crf_masks_shard` (resumable, one palette
PNG per image) and :func:`evaluate_masks` (any folder of ``<id>.png`` masks against the dataset's GT).

Input safety (differences from the references, none of which changes a result the references can
produce): the image must be RGB ``uint8`` H×W×3 (copied only when it is not already a writable
C-contiguous array, which pydensecrf needs; a float image — e.g. a mean-subtracted one — is refused rather than wrapped), unaries are
float32 C-contiguous, the maps must have the image's size (``ValueError`` with both shapes), an
image without foreground classes returns all background without running the CRF (the reference
fails there: ``np.max`` of an empty stack), and a one-label CRF returns that label (the reference
divides by zero in ``unary_from_labels``).

Reference quirk *not* reproduced: the KTSE/BECO DeepLab test script feeds the CRF the
mean-subtracted image cast to ``uint8`` (negative values wrap; ``KTSE:segmentation/test.py``).
:func:`deeplab_crf` takes the raw RGB image. See ``docs/crf.md``.

``pydensecrf`` is imported by the functions that run a CRF, so that :func:`evaluate_masks` and the
parameter checks work without it (the ``data`` conda env, where ``eval_masks`` runs, has none).
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ..io import DataError, read_label_png, voc_palette, write_label_png
from ..metrics import ConfusionMatrix
from ..workflow.per_image import map_images

__all__ = [
    "PSA_PAIRWISE",
    "IRN_PAIRWISE",
    "crf_with_alpha",
    "crf_inference_label",
    "crf_seed_threshold",
    "deeplab_crf",
    "crf_settings",
    "alpha_for_threshold",
    "crf_params_for_seeds",
    "crf_mask",
    "mask_path",
    "crf_masks_shard",
    "evaluate_masks",
]

#: Pairwise terms of the PSA CRF (AEFT ``crf_inference_ysh``, HFPL/SMAF ``crf_inference``).
PSA_PAIRWISE: Dict[str, float] = {"gauss_sxy": 3, "gauss_compat": 3, "bi_sxy": 80, "bi_srgb": 13, "bi_compat": 10}
#: Pairwise terms of the IRN label CRF (``crf_inference_label``).
IRN_PAIRWISE: Dict[str, float] = {"gauss_sxy": 3, "gauss_compat": 3, "bi_sxy": 50, "bi_srgb": 5, "bi_compat": 10}
#: ``unary_from_softmax``'s clip: probabilities below this become this before ``-log``.
PROB_CLIP = 1e-5


# --------------------------------------------------------------------------------------------
# input checks and the shared CRF core
# --------------------------------------------------------------------------------------------


def _rgb(img: Any, size: Tuple[int, int], what: str) -> np.ndarray:
    """The image as a writable C-contiguous uint8 H×W×3 array of size ``size`` (no copy if it already is)."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{what}: image must be an RGB array of shape (H, W, 3), got shape {img.shape}")
    if img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.integer):
            raise ValueError(
                f"{what}: image must be uint8 RGB (raw pixel values), got dtype {img.dtype}; a float or "
                "mean-subtracted image would be wrapped by the uint8 cast the CRF needs"
            )
        if img.size and (img.min() < 0 or img.max() > 255):
            raise ValueError(f"{what}: integer image values must lie in [0, 255], got [{img.min()}, {img.max()}]")
        img = img.astype(np.uint8)
    if tuple(img.shape[:2]) != tuple(size):
        raise ValueError(
            f"{what}: image size {tuple(img.shape[:2])} (H, W) does not match the maps' size {tuple(size)} "
            f"(image shape {img.shape})"
        )
    # pydensecrf takes a writable C-contiguous buffer (PIL-backed arrays are read-only); copies only if needed
    return np.require(img, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])


def _check_iterations(t: Any) -> int:
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
        raise ValueError(f"CRF iterations t must be a non-negative integer, got {t!r}")
    return int(t)


def _maps(x: Any, what: str, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"{what}: {name} must have shape (C, H, W), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what}: {name} must be a float array, got dtype {x.dtype}")
    return x


def _dense_crf(
    img: np.ndarray,
    unary: np.ndarray,
    n_labels: int,
    t: int,
    gauss_sxy: float,
    gauss_compat: float,
    bi_sxy: float,
    bi_srgb: float,
    bi_compat: float,
) -> np.ndarray:
    """Mean-field inference; ``img`` checked uint8 H×W×3, ``unary`` (n_labels, H·W). Returns Q (n, H, W) float32.

    pydensecrf defaults are kept (diagonal kernels, symmetric normalisation, Potts compatibility
    equal to the scalar ``compat``), as in every reference.
    """
    import pydensecrf.densecrf as dcrf

    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)  # width first
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    d.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=img, compat=bi_compat)
    q = np.asarray(d.inference(t))  # a view of pydensecrf's result matrix (kept alive as .base): no copy
    return q.reshape(n_labels, h, w)


def _softmax_unary(probs: np.ndarray) -> np.ndarray:
    """``unary_from_softmax`` on float32 input (``-log(clip(p, 1e-5, 1))``, float32)."""
    from pydensecrf.utils import unary_from_softmax

    return unary_from_softmax(probs if probs.dtype == np.float32 else probs.astype(np.float32), clip=PROB_CLIP)


def _key_lut(keys: np.ndarray, what: str) -> np.ndarray:
    """Key index (0 = background, k = k-th present class) -> label id (0, keys + 1), uint8."""
    if keys.size and (keys.min() < 0 or keys.max() > 253):
        raise ValueError(f"{what}: keys must be 0-based foreground class indices in [0, 253], got {keys.tolist()}")
    return np.concatenate([[0], keys + 1]).astype(np.uint8)


def _keys(keys: Any, k: int, what: str) -> np.ndarray:
    keys = np.asarray(keys).reshape(-1)
    if keys.size and not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"{what}: keys must be integers, got dtype {keys.dtype}")
    if keys.size != k:
        raise ValueError(f"{what}: {keys.size} keys for {k} CAM planes")
    return keys.astype(np.int64)


# --------------------------------------------------------------------------------------------
# the three flavours
# --------------------------------------------------------------------------------------------


def crf_with_alpha(
    img: Any,
    high_res: Any,
    keys: Any,
    alpha: float,
    t: int = 10,
    gauss_sxy: float = 3,
    gauss_compat: float = 3,
    bi_sxy: float = 80,
    bi_srgb: float = 13,
    bi_compat: float = 10,
) -> Tuple[np.ndarray, np.ndarray]:
    """PSA "CRF with alpha" of one image's CAMs.

    ``img``: uint8 H×W×3 RGB; ``high_res``: K×H×W CAMs in [0, 1] of the classes ``keys`` (0-based
    foreground indices, as in :class:`wsss.cams.CamStore`); ``alpha`` > 0 sharpens the background
    score ``(1 - max_c CAM) ** alpha`` (larger alpha → smaller background score → more foreground).

    Returns ``(probs, labels)``: ``probs`` float32 (K+1)×H×W, the CRF marginals (plane 0 =
    background, plane k = class ``keys[k-1]``; they sum to 1 per pixel) — the reference saves exactly
    these planes as its ``{0: bg, key+1: ...}`` dict — and ``labels`` uint8 H×W, their argmax as
    label ids (0 = background, ``keys + 1``).
    """
    what = "crf_with_alpha"
    cams = _maps(high_res, what, "high_res")
    k, h, w = cams.shape
    keys = _keys(keys, k, what)
    lut = _key_lut(keys, what)
    img = _rgb(img, (h, w), what)
    t = _check_iterations(t)
    if not (isinstance(alpha, numbers.Real) and np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"{what}: alpha must be a finite number >= 0, got {alpha!r}")
    if k == 0:  # no foreground class: everything is background (the reference crashes here)
        return np.ones((1, h, w), np.float32), np.zeros((h, w), np.uint8)
    scores = np.empty((k + 1, h, w), np.float32)
    scores[1:] = cams
    bg = scores[0]
    np.max(scores[1:], axis=0, out=bg)
    np.clip(bg, 0.0, 1.0, out=bg)  # stored CAMs are in [0, 1]; guard the power against 1 - max < 0
    np.subtract(1.0, bg, out=bg)
    np.power(bg, np.float32(alpha), out=bg)
    probs = _dense_crf(img, _softmax_unary(scores), k + 1, t, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat)
    return probs, lut[probs.argmax(0)]


def crf_inference_label(
    img: Any,
    labels: Any,
    n_labels: int,
    t: int = 10,
    gt_prob: float = 0.7,
    gauss_sxy: float = 3,
    gauss_compat: float = 3,
    bi_sxy: float = 50,
    bi_srgb: float = 5,
    bi_compat: float = 10,
) -> np.ndarray:
    """IRN label CRF: hard labels in ``[0, n_labels)`` (H×W) → CRF argmax (uint8 H×W, same label space).

    Unary ``unary_from_labels(labels, n_labels, gt_prob, zero_unsure=False)``: probability
    ``gt_prob`` for the given label and ``(1 - gt_prob) / (n_labels - 1)`` for each other one;
    label 0 is an ordinary label. With ``n_labels == 1`` every pixel is label 0 (no CRF is run).
    """
    what = "crf_inference_label"
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{what}: labels must be a 2-D (H, W) map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers, got dtype {labels.dtype}")
    if isinstance(n_labels, bool) or not isinstance(n_labels, numbers.Integral) or not 1 <= n_labels <= 256:
        raise ValueError(f"{what}: n_labels must be an integer in [1, 256], got {n_labels!r}")
    n_labels = int(n_labels)
    h, w = labels.shape
    img = _rgb(img, (h, w), what)
    t = _check_iterations(t)
    if not 0 < gt_prob < 1:
        raise ValueError(f"{what}: gt_prob must lie in (0, 1), got {gt_prob!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(
            f"{what}: labels span [{labels.min()}, {labels.max()}], outside [0, {n_labels}) for n_labels={n_labels}"
        )
    if n_labels == 1:
        return np.zeros((h, w), np.uint8)
    from pydensecrf.utils import unary_from_labels

    unary = unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False)
    q = _dense_crf(img, unary, n_labels, t, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat)
    return q.argmax(0).astype(np.uint8)


def crf_seed_threshold(
    img: Any,
    high_res: Any,
    keys: Any,
    bg_threshold: float,
    t: int = 10,
    gt_prob: float = 0.7,
    gauss_sxy: float = 3,
    gauss_compat: float = 3,
    bi_sxy: float = 50,
    bi_srgb: float = 5,
    bi_compat: float = 10,
) -> np.ndarray:
    """CAM seed at a constant background score, refined with the IRN label CRF → uint8 label ids.

    The seed is :func:`wsss.seeds.cam_to_label`'s ``argmax([bg_threshold, cam_1..cam_K])`` (in key
    space), then :func:`crf_inference_label` with ``n_labels = K + 1`` — SMAF ``gen_pseudo_mask``
    (bg 0.20) and one half of IRN ``cam_to_ir_label``.
    """
    what = "crf_seed_threshold"
    cams = _maps(high_res, what, "high_res")
    k, h, w = cams.shape
    keys = _keys(keys, k, what)
    lut = _key_lut(keys, what)
    img = _rgb(img, (h, w), what)
    if k == 0:
        return np.zeros((h, w), np.uint8)
    scores = np.empty((k + 1, h, w), np.float32)
    scores[0] = bg_threshold
    scores[1:] = cams
    seed = scores.argmax(0)
    out = crf_inference_label(
        img,
        seed,
        k + 1,
        t=t,
        gt_prob=gt_prob,
        gauss_sxy=gauss_sxy,
        gauss_compat=gauss_compat,
        bi_sxy=bi_sxy,
        bi_srgb=bi_srgb,
        bi_compat=bi_compat,
    )
    return lut[out]


def deeplab_crf(
    img: Any,
    probs: Any,
    t: int = 10,
    pos_w: float = 3,
    pos_xy_std: float = 1,
    bi_w: float = 4,
    bi_xy_std: float = 67,
    bi_rgb_std: float = 3,
) -> np.ndarray:
    """DeepLab test-time CRF: class probabilities C×H×W (softmax of the logits) → refined C×H×W float32.

    Unary ``unary_from_softmax`` (``-log(clip(p, 1e-5, 1))``); Gaussian (``pos_xy_std``, ``pos_w``),
    bilateral (``bi_xy_std``, ``bi_rgb_std``, ``bi_w``). ``img`` is the raw uint8 RGB image — the
    KTSE/BECO test script's uint8-wrapped mean-subtracted image is not reproduced. A single-class
    input is returned as all ones without running the CRF.
    """
    what = "deeplab_crf"
    p = _maps(probs, what, "probs")
    c, h, w = p.shape
    if c == 0:
        raise ValueError(f"{what}: probs has no class planes (shape {p.shape})")
    img = _rgb(img, (h, w), what)
    t = _check_iterations(t)
    if c == 1:
        return np.ones((1, h, w), np.float32)
    return _dense_crf(img, _softmax_unary(p), c, t, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w)


# --------------------------------------------------------------------------------------------
# stage: config section ``crf``
# --------------------------------------------------------------------------------------------

#: Keys of the section that the workflow reads (the number of jobs); dropped by :func:`crf_settings`.
WORKFLOW_KEYS = ("shards",)
#: The modes of the section (the schema's enum of ``crf.mode``).
MODES = ("alpha", "threshold")


def alpha_for_threshold(t: float) -> float:
    """The alpha at which the PSA CRF's background score ``(1 - m) ** alpha`` equals the CAM score
    ``m`` exactly at ``m = t``: ``ln t / ln(1 - t)`` (t = 0.2 gives 7.2, 0.55 gives 0.75). Pixels
    whose CAM is above ``t`` then start with a foreground unary above the background's, as the
    seeds at threshold ``t`` have them."""
    t = float(t)
    if not 0.0 < t < 1.0:
        raise ValueError(f"a seed threshold in (0, 1) is needed for the CRF's alpha, got {t!r}")
    return math.log(t) / math.log(1.0 - t)


def crf_params_for_seeds(params: Mapping[str, Any], threshold: Optional[float]) -> Dict[str, Any]:
    """The ``crf`` section with ``from_seeds: true`` resolved against the seed threshold chosen on
    the sweep: ``alpha`` mode gets :func:`alpha_for_threshold`, ``threshold`` mode gets
    ``bg_threshold = threshold``; ``from_seeds`` is then false. Sections without ``from_seeds``
    are returned as they are (``threshold`` unused)."""
    out = dict(params or {})
    if not out.get("from_seeds"):
        return out
    if threshold is None:
        raise ValueError("crf.from_seeds is set but no seed threshold was given (seeds/threshold_sweep.csv)")
    if out.get("mode", "alpha") == "alpha":
        out["alpha"] = alpha_for_threshold(threshold)
    else:
        out["bg_threshold"] = float(threshold)
    out["from_seeds"] = False
    return out


def crf_settings(params: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The ``crf`` config section as :func:`crf_mask` takes it: checked against the config schema
    with missing keys at the schema's defaults (:func:`wsss.config.validate_section`; a bad or
    unknown key raises a ``ValueError`` naming it), pairwise terms left ``null`` set to the
    flavour's reference values (:data:`PSA_PAIRWISE` in ``alpha`` mode, :data:`IRN_PAIRWISE` in
    ``threshold`` mode), numbers as floats and the workflow keys dropped. ``from_seeds: true`` in
    ``params`` is refused (resolve it with :func:`crf_params_for_seeds` first); left out, the fixed
    ``alpha`` / ``bg_threshold`` apply."""
    from ..config import validate_section

    out = validate_section("crf", params)
    out.pop("from_seeds")  # the schema's default (true) is the workflow's; here only a given true counts
    if (params or {}).get("from_seeds"):
        raise ValueError(
            "crf.from_seeds is set: resolve alpha / bg_threshold from the chosen seed threshold first "
            "(wsss.refine.crf.crf_params_for_seeds)"
        )
    for k in WORKFLOW_KEYS:
        out.pop(k, None)
    flavour = PSA_PAIRWISE if out["mode"] == "alpha" else IRN_PAIRWISE
    for k in ("alpha", "bg_threshold", "gt_prob", *PSA_PAIRWISE):
        out[k] = float(flavour[k] if out.get(k) is None and k in flavour else out[k])
    out["iterations"] = int(out["iterations"])
    return out


def crf_mask(img: np.ndarray, high_res: np.ndarray, keys: np.ndarray, resolved: Mapping[str, Any]) -> np.ndarray:
    """One image's CRF mask (uint8 label ids) with :func:`crf_settings`'s output."""
    pairwise = {k: resolved[k] for k in PSA_PAIRWISE}
    if resolved["mode"] == "alpha":
        return crf_with_alpha(img, high_res, keys, resolved["alpha"], t=resolved["iterations"], **pairwise)[1]
    return crf_seed_threshold(
        img, high_res, keys, resolved["bg_threshold"], t=resolved["iterations"], gt_prob=resolved["gt_prob"], **pairwise
    )


def mask_path(out_dir: str | os.PathLike, image_id: str) -> Path:
    return Path(out_dir) / f"{image_id}.png"


# Per-process state of the worker pool (set by _init_worker; the store reopens its files per process).
_WORKER: Dict[str, Any] = {}
_PALETTE = voc_palette()


def _init_worker(ds: Any, store: Any, out_dir: str, resolved: Dict[str, Any]) -> None:
    _WORKER.update(ds=ds, store=store, out_dir=out_dir, resolved=resolved)


def _process(ds: Any, store: Any, out_dir: str | os.PathLike, resolved: Mapping[str, Any], image_id: str) -> str:
    rec = store.get(image_id, fields=("keys", "high_res"))
    img = ds.load_image(image_id)
    if tuple(img.shape[:2]) != tuple(rec.size):
        raise DataError(
            f"image {image_id!r} ({ds.image_path(image_id)}) has size {tuple(img.shape[:2])} but its CAM "
            f"has size {tuple(rec.size)}"
        )
    write_label_png(mask_path(out_dir, image_id), crf_mask(img, rec.high_res, rec.keys, resolved), _PALETTE)
    return image_id


def _process_in_worker(image_id: str) -> str:
    w = _WORKER
    return _process(w["ds"], w["store"], w["out_dir"], w["resolved"], image_id)


def crf_masks_shard(
    ds: Any,
    store: Any,
    ids: Sequence[str],
    out_dir: str | os.PathLike,
    params: Optional[Mapping[str, Any]],
    progress: bool = True,
    workers: int = 1,
    journal: Any = None,
) -> Dict[str, int]:
    """CRF masks of ``ids`` as palette PNGs ``<out_dir>/<id>.png`` (label ids, VOC palette), atomically.

    ``ds``: a :class:`wsss.data.base.SegDataset` (images); ``store``: a :class:`wsss.cams.CamStore`
    (``keys``, ``high_res``); ``params``: the ``crf`` config section (:func:`crf_settings`).
    Every PNG is (re)written except those an interrupted attempt of the same job recorded in
    ``journal`` (:class:`wsss.workflow.journal.ShardJournal`; None: no resume). ``workers`` > 1
    runs the CRFs in that many processes (pydensecrf is single-threaded). Returns
    ``{"written": n, "skipped": m}``.
    """
    resolved = crf_settings(params)
    ids = list(ids)
    missing = [i for i in ids if i not in store]
    if missing:
        raise KeyError(f"{len(missing)} image(s) have no CAM in the store, e.g. {missing[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return map_images(
        ids,
        lambda i: _process(ds, store, out_dir, resolved, i),
        exists=lambda i: mask_path(out_dir, i).exists(),
        journal=journal,
        workers=workers,
        worker_fn=_process_in_worker,
        initializer=_init_worker,
        initargs=(ds, store, str(out_dir), resolved),
        desc=f"CRF ({resolved['mode']})",
        progress=progress,
    )


# --------------------------------------------------------------------------------------------
# evaluation of a folder of masks
# --------------------------------------------------------------------------------------------


def evaluate_masks(
    ds: Any, ids: Iterable[str], mask_dir: str | os.PathLike, progress: bool = False, ignore_index: Optional[int] = 255
) -> ConfusionMatrix:
    """Confusion matrix of the masks ``<mask_dir>/<id>.png`` against the dataset's ground truth.

    Works for any label-id PNGs (CRF masks, IR labels — their 255 pixels count as unlabelled
    predictions —, IRN masks). A missing PNG or a size mismatch raises :class:`DataError` naming the
    file.
    """
    cm = ConfusionMatrix(ds.num_classes, ignore_index)
    ids = list(ids)
    for image_id in tqdm(ids, desc="evaluate masks", disable=not progress, mininterval=2.0, unit="img"):
        path = mask_path(mask_dir, image_id)
        if not path.exists():
            raise DataError(f"mask of image {image_id!r} not found: {path}")
        pred = read_label_png(path)
        gt = ds.load_mask(image_id)
        if pred.shape != gt.shape:
            raise DataError(
                f"mask {path} has size {pred.shape} but the ground truth of {image_id!r} has size {gt.shape}"
            )
        cm.update(gt, pred)
    return cm
