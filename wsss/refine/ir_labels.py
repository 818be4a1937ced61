"""IR labels (IRN ``step/cam_to_ir_label.py``): the part of IRN that needs no torch.

* :func:`cam_to_ir_label`: confident foreground / background of one image from two CRF-refined
  thresholds, 255 (:data:`IGNORE`) in between;
* :func:`make_ir_labels`: the stage, IR labels of a shard of images as palette PNGs
  (:func:`ir_label_path`), resumable.

Kept apart from :mod:`wsss.refine.irn` (the network, its training and inference, which need
torch) so that the ``ir_labels_shard`` rule runs in the ``crf`` conda env, which has no torch;
:mod:`wsss.refine.irn` re-exports these names. See docs/irn.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from ..io import DataError, voc_palette, write_label_png
from ..workflow.per_image import map_images
from .irn_params import IRLabelParams

__all__ = ["IGNORE", "cam_to_ir_label", "ir_label_path", "make_ir_labels"]

#: Label of the pixels between the two thresholds (uncertain), ignored by IRN training.
IGNORE = 255
_PALETTE = voc_palette()


def _default_crf() -> Callable[..., np.ndarray]:
    from .crf import crf_inference_label  # lazy: pydensecrf is only needed for this step

    return crf_inference_label


def cam_to_ir_label(
    img: np.ndarray,
    high_res: np.ndarray,
    keys: Sequence[int],
    fg_thresh: float = 0.30,
    bg_thresh: float = 0.05,
    crf_fn: Optional[Callable[..., np.ndarray]] = None,
    crf_params: Optional[Mapping[str, Any]] = None,
) -> np.ndarray:
    """IRN inter-pixel-relation label of one image (reference ``step/cam_to_ir_label.py``).

    ``img``: uint8 ``H × W × 3`` RGB; ``high_res``: ``K × H × W`` CAMs in [0, 1]; ``keys``: the K
    foreground class indices (0-based). Two label maps in key space (0 = background, k = k-th
    class): argmax of the CAMs behind a constant plane ``fg_thresh`` (resp. ``bg_thresh``), each
    refined by ``crf_fn(img, labels, n_labels=K+1, **crf_params)`` (default: the IRN label CRF
    :func:`wsss.refine.crf.crf_inference_label`) and mapped to label ids ``[0] + (keys + 1)``.
    Result (uint8 ``H × W``): the class id where the high-threshold map is foreground, 0 where
    both maps are background, 255 (uncertain) elsewhere.

    An image without foreground classes (``K = 0``, e.g. an unlabelled COCO image) gets an
    all-background label without running the CRF, as BECO's COCO step does (the reference divides by
    zero there).
    """
    high_res = np.asarray(high_res, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if high_res.ndim != 3 or high_res.shape[0] != len(keys):
        raise ValueError(f"cam_to_ir_label: high_res must have shape (K={len(keys)}, H, W), got {high_res.shape}")
    h, w = high_res.shape[1:]
    img = np.asarray(img)
    if img.shape[:2] != (h, w):
        raise ValueError(f"cam_to_ir_label: image size {img.shape[:2]} does not match the CAM size {(h, w)}")
    if len(keys) and (keys.min() < 0 or keys.max() + 1 >= IGNORE):
        raise ValueError(f"cam_to_ir_label: keys must be class indices in [0, {IGNORE - 2}], got {keys.tolist()}")
    if len(keys) == 0:
        return np.zeros((h, w), dtype=np.uint8)
    crf_fn = crf_fn or _default_crf()
    crf_params = dict(crf_params or {})
    lut = np.concatenate([[0], keys + 1]).astype(np.uint8)

    def confident(thresh: float) -> np.ndarray:
        stack = np.concatenate([np.full((1, h, w), thresh, dtype=np.float32), high_res], axis=0)
        labels = stack.argmax(0)  # ties -> background (first index), as the reference
        refined = np.asarray(crf_fn(img, labels, n_labels=len(keys) + 1, **crf_params))
        if refined.shape != (h, w) or refined.min() < 0 or refined.max() > len(keys):
            raise ValueError(
                f"cam_to_ir_label: the CRF returned shape {refined.shape} with values outside [0, {len(keys)}]"
            )
        return lut[refined.astype(np.int64)]

    fg = confident(fg_thresh)
    bg = confident(bg_thresh)
    out = fg.copy()
    out[fg == 0] = IGNORE
    out[(fg == 0) & (bg == 0)] = 0
    return out


def ir_label_path(label_dir: Union[str, os.PathLike], image_id: str) -> Path:
    return Path(label_dir) / f"{image_id}.png"


_WORKER: Dict[str, Any] = {}


def _ir_label_one(ds: Any, store: Any, out_dir: Path, p: IRLabelParams, crf_fn, image_id: str) -> str:
    rec = store.get(image_id, fields=("keys", "high_res"))
    img = ds.load_image(image_id)
    if tuple(img.shape[:2]) != tuple(rec.size):
        raise DataError(f"image {image_id!r} has size {tuple(img.shape[:2])} but its CAM has size {tuple(rec.size)}")
    label = cam_to_ir_label(img, rec.high_res, rec.keys, p.fg_thresh, p.bg_thresh, crf_fn, p.crf)
    write_label_png(ir_label_path(out_dir, image_id), label, _PALETTE)
    return image_id


def _init_ir_worker(ds, store, out_dir, p, crf_fn) -> None:
    _WORKER.update(ds=ds, store=store, out_dir=out_dir, p=p, crf_fn=crf_fn)


def _ir_label_in_worker(image_id: str) -> str:
    w = _WORKER
    return _ir_label_one(w["ds"], w["store"], w["out_dir"], w["p"], w["crf_fn"], image_id)


def make_ir_labels(
    ds: Any,
    store: Any,
    ids: Sequence[str],
    out_dir: Union[str, os.PathLike],
    params: Union[IRLabelParams, Mapping[str, Any], None] = None,
    crf_fn: Optional[Callable[..., np.ndarray]] = None,
    *,
    workers: int = 1,
    progress: bool = True,
    journal: Any = None,
) -> Dict[str, int]:
    """IR labels of ``ids`` as palette PNGs ``<out_dir>/<id>.png`` (values 0, class ids, 255).

    ``ds``: a :class:`wsss.data.base.SegDataset` (images); ``store``: a :class:`wsss.cams.CamStore`
    (``keys``, ``high_res``); ``params``: ``irn.ir_label`` (:class:`IRLabelParams`); ``crf_fn``: the
    label CRF (default :func:`wsss.refine.crf.crf_inference_label`). PNGs are written atomically;
    every id is (re)written except those an interrupted attempt of the same job recorded in
    ``journal`` (:class:`wsss.workflow.journal.ShardJournal`; None: no resume). ``workers`` > 1
    runs that many processes (forked; ``crf_fn`` must be a module-level function). Returns
    ``{"written": n, "skipped": m}``.
    """
    p = IRLabelParams.from_mapping(params)
    ids = list(ids)
    missing = [i for i in ids if i not in store]
    if missing:
        raise KeyError(f"{len(missing)} image(s) have no CAM in the store, e.g. {missing[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return map_images(
        ids,
        lambda i: _ir_label_one(ds, store, out_dir, p, crf_fn, i),
        exists=lambda i: ir_label_path(out_dir, i).exists(),
        journal=journal,
        workers=workers,
        worker_fn=_ir_label_in_worker,
        initializer=_init_ir_worker,
        initargs=(ds, store, out_dir, p, crf_fn),
        desc="IR labels",
        progress=progress,
    )
