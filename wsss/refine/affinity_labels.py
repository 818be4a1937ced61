"""AffinityNet's training labels (PSA ``voc12/data.py::VOC12AffDataset``, ``infer_cls.py``): the part
of AffinityNet that needs no torch.

* :func:`psa_label`, :func:`downsample_scores`, :func:`downsample_label`, :func:`psa_training_label`:
  the training label from the low- and high-alpha CRF label maps;
* :func:`crf_label_pair` and the stage :func:`make_affinity_labels`: the two CRF label maps per
  image as palette PNGs (:func:`label_pair_paths`), resumable.

Kept apart from :mod:`wsss.refine.affinitynet` (the network, its training and the random walk,
which need torch) so that the ``affinity_labels_shard`` rule runs in the ``crf`` conda env, which
has no torch; :mod:`wsss.refine.affinitynet` re-exports these names. See docs/affinitynet.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..io import DataError, read_label_png, voc_palette, write_label_png
from ..workflow.per_image import map_images
from .affinitynet_params import AffinityLabelParams

__all__ = [
    "IGNORE",
    "psa_label",
    "downsample_scores",
    "downsample_label",
    "psa_training_label",
    "crf_label_pair",
    "label_pair_paths",
    "read_label_pair",
    "make_affinity_labels",
]

IGNORE = 255
_PALETTE = voc_palette()


# ----------------------------------------------------------------------------------------------
# training labels (voc12/data.py::VOC12AffDataset)
# ----------------------------------------------------------------------------------------------


def psa_label(la: Any, ha: Any, valid: Optional[Any] = None) -> np.ndarray:
    """The PSA training label from the low-alpha (``la``) and high-alpha (``ha``) CRF label maps
    (reference ``VOC12AffDataset.__getitem__``): ``la`` where ``la`` is foreground, 255 where ``la``
    is background, then 0 where ``ha`` is background, then 255 where there is no score (``valid``
    False, or 255 in either map — the reference's zero-padded crop border).

    A small ``alpha`` gives a large background score, so the low-alpha CRF's foreground is confident
    foreground; a large ``alpha`` gives a small background score, so the high-alpha CRF's background
    is confident background. Labels may be label ids or key indices (only equality matters later).
    Returns uint8 of the maps' shape.
    """
    la = np.asarray(la)
    ha = np.asarray(ha)
    if la.shape != ha.shape:
        raise ValueError(f"psa_label: low-alpha label {la.shape} and high-alpha label {ha.shape} differ in shape")
    if la.size and (la.min() < 0 or la.max() > IGNORE or ha.min() < 0 or ha.max() > IGNORE):
        raise ValueError("psa_label: labels must lie in [0, 255]")
    out = la.astype(np.uint8).copy()
    out[la == 0] = IGNORE
    out[ha == 0] = 0
    out[(la == IGNORE) | (ha == IGNORE)] = IGNORE
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != la.shape:
            raise ValueError(f"psa_label: valid mask {valid.shape} does not match the labels {la.shape}")
        out[~valid] = IGNORE
    return out


def downsample_scores(scores: Any, stride: int) -> np.ndarray:
    """``C × H × W`` score maps averaged over ``stride × stride`` blocks (reference
    ``tool/imutils.py::AvgPool2d`` = ``skimage.measure.block_reduce(…, np.mean)``): the maps are
    zero-padded at the bottom/right to a multiple of ``stride`` and every block is averaged over
    all ``stride²`` cells. Returns float32 ``C × ceil(H/s) × ceil(W/s)``."""
    s = np.asarray(scores, dtype=np.float32)
    if s.ndim != 3:
        raise ValueError(f"downsample_scores: scores must have shape (C, H, W), got {s.shape}")
    stride = int(stride)
    if stride < 1:
        raise ValueError(f"downsample_scores: stride must be >= 1, got {stride}")
    c, h, w = s.shape
    hs, ws = -(-h // stride), -(-w // stride)
    s = np.pad(s, ((0, 0), (0, hs * stride - h), (0, ws * stride - w)))
    return s.reshape(c, hs, stride, ws, stride).mean(axis=(2, 4), dtype=np.float64).astype(np.float32)


def downsample_label(label: Any, stride: int) -> np.ndarray:
    """A label map downsampled as the reference downsamples the CRF scores: one-hot planes (255
    contributes to none), :func:`downsample_scores`, argmax (ties → the smaller label), 255 where a
    block holds no scored pixel (``max < 1e-5``, the reference's ``no_score_region``). With one-hot
    CRF outputs this is exactly the reference's pooling: each block takes its most frequent label."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"downsample_label: label must have shape (H, W), got {label.shape}")
    values = np.unique(label[label != IGNORE])
    hs, ws = -(-label.shape[0] // int(stride)), -(-label.shape[1] // int(stride))
    if values.size == 0:
        return np.full((hs, ws), IGNORE, np.uint8)
    onehot = (label[None] == values[:, None, None]).astype(np.float32)
    pooled = downsample_scores(onehot, stride)
    out = values[pooled.argmax(0)].astype(np.uint8)
    out[pooled.max(0) < 1e-5] = IGNORE
    return out


def psa_training_label(la: Any, ha: Any, stride: int = 8) -> np.ndarray:
    """The PSA training label on the feature grid from two full-resolution CRF label maps (255 =
    no score, e.g. crop padding): each map downsampled by :func:`downsample_label`, then combined
    by :func:`psa_label` (the reference pools and takes the argmax of each score stack first and
    combines afterwards). Returns uint8 ``ceil(H/s) × ceil(W/s)``."""
    return psa_label(downsample_label(la, stride), downsample_label(ha, stride))


def crf_label_pair(
    img: np.ndarray,
    high_res: np.ndarray,
    keys: Sequence[int],
    params: Union[AffinityLabelParams, Mapping[str, Any], None] = None,
    crf_fn: Optional[Callable[..., Tuple[np.ndarray, np.ndarray]]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """The low-alpha and high-alpha CRF label maps of one image (``infer_cls.py`` of PSA: "CRF with
    alpha" at ``low_alpha`` and ``high_alpha``; default ``crf_fn`` :func:`wsss.refine.crf.crf_with_alpha`).
    Returns ``(la, ha)``, uint8 label ids ``H × W``."""
    p = AffinityLabelParams.from_mapping(params)
    if crf_fn is None:
        from .crf import crf_with_alpha as crf_fn  # lazy: pydensecrf only for this step
    la = crf_fn(img, high_res, keys, p.low_alpha, **dict(p.crf))[1]
    ha = crf_fn(img, high_res, keys, p.high_alpha, **dict(p.crf))[1]
    return np.asarray(la, np.uint8), np.asarray(ha, np.uint8)


def label_pair_paths(label_dir: Union[str, os.PathLike], image_id: str) -> Tuple[Path, Path]:
    """``(<label_dir>/la/<id>.png, <label_dir>/ha/<id>.png)``: the low- and high-alpha CRF label maps."""
    d = Path(label_dir)
    return d / "la" / f"{image_id}.png", d / "ha" / f"{image_id}.png"


def read_label_pair(label_dir: Union[str, os.PathLike], image_id: str) -> Tuple[np.ndarray, np.ndarray]:
    la, ha = label_pair_paths(label_dir, image_id)
    return read_label_png(la), read_label_png(ha)


_WORKER: Dict[str, Any] = {}


def _label_one(ds: Any, store: Any, out_dir: Path, p: AffinityLabelParams, crf_fn, image_id: str) -> str:
    rec = store.get(image_id, fields=("keys", "high_res"))
    img = ds.load_image(image_id)
    if tuple(img.shape[:2]) != tuple(rec.size):
        raise DataError(f"image {image_id!r} has size {tuple(img.shape[:2])} but its CAM has size {tuple(rec.size)}")
    la, ha = crf_label_pair(img, rec.high_res, rec.keys, p, crf_fn)
    la_path, ha_path = label_pair_paths(out_dir, image_id)
    write_label_png(la_path, la, _PALETTE)
    write_label_png(ha_path, ha, _PALETTE)
    return image_id


def _init_label_worker(ds, store, out_dir, p, crf_fn) -> None:
    _WORKER.update(ds=ds, store=store, out_dir=out_dir, p=p, crf_fn=crf_fn)


def _label_in_worker(image_id: str) -> str:
    w = _WORKER
    return _label_one(w["ds"], w["store"], w["out_dir"], w["p"], w["crf_fn"], image_id)


def make_affinity_labels(
    ds: Any,
    store: Any,
    ids: Sequence[str],
    out_dir: Union[str, os.PathLike],
    params: Union[AffinityLabelParams, Mapping[str, Any], None] = None,
    crf_fn: Optional[Callable[..., Tuple[np.ndarray, np.ndarray]]] = None,
    *,
    workers: int = 1,
    progress: bool = True,
    journal: Any = None,
) -> Dict[str, int]:
    """The low- and high-alpha CRF label maps of ``ids`` (``affinitynet.label``) as palette PNGs
    ``<out_dir>/la/<id>.png`` and ``<out_dir>/ha/<id>.png`` (label ids, image resolution), from the
    ``keys`` and ``high_res`` of the :class:`wsss.cams.CamStore` ``store``. Atomic writes; ids an
    interrupted attempt recorded in ``journal`` are skipped. ``workers`` > 1 runs processes
    (``crf_fn`` must then be a module-level function). Returns ``{"written": n, "skipped": m}``."""
    p = AffinityLabelParams.from_mapping(params)
    ids = list(ids)
    missing = [i for i in ids if i not in store]
    if missing:
        raise KeyError(f"{len(missing)} image(s) have no CAM in the store, e.g. {missing[:5]}")
    out_dir = Path(out_dir)
    (out_dir / "la").mkdir(parents=True, exist_ok=True)
    (out_dir / "ha").mkdir(parents=True, exist_ok=True)

    def exists(i: str) -> bool:
        return all(q.exists() for q in label_pair_paths(out_dir, i))

    return map_images(
        ids,
        lambda i: _label_one(ds, store, out_dir, p, crf_fn, i),
        exists=exists,
        journal=journal,
        workers=workers,
        worker_fn=_label_in_worker,
        initializer=_init_label_worker,
        initargs=(ds, store, out_dir, p, crf_fn),
        desc="AffinityNet labels",
        progress=progress,
    )
