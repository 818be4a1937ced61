"""The refinement stages on controlled CAMs: seeds, +CRF and IRN's walk side by side.

The tiny preset's classifier is too weak for its CAMs to say anything about a refinement stage, so
this gives the stages CAM-like maps (a bump on one part of each object, as wide as ``SIGMA`` x its
equivalent radius, short of its boundaries, spilling a little into the background) on images of the
synthetic generator at the default preset's geometry. The CRF runs as the workflow runs it
(``crf.from_seeds``: the background from the threshold chosen on the sweep); IRN's walk runs with
the workflow's ``irn.infer`` settings on a boundary map drawn on the object outlines, i.e. what a
well-trained IRN predicts. tests/test_refinement_order.py asserts the ordering the papers report on
the same data; this script prints the figures, over all images and over the images whose objects
each cover at least ``MIN_OBJECT_PIXELS`` (docs/irn.md, "Small objects")::

    python bench/refinement_order.py --images 40
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from wsss.config import validate_config
from wsss.data import open_dataset
from wsss.data.synthetic import generate_synthetic
from wsss.metrics import ConfusionMatrix
from wsss.refine.crf import crf_mask, crf_params_for_seeds, crf_settings
from wsss.refine.irn_params import STRIDE, IRNInferParams
from wsss.refine.random_walk import outline_boundary_map, random_walk, sem_seg_from_walk
from wsss.seeds import cam_to_label


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    r = int(3 * sigma)
    g = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float64) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    t = torch.from_numpy(np.asarray(x, np.float32))[None, None]
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))
    return t[0, 0].numpy()


def _depth(inside: np.ndarray) -> np.ndarray:
    """Chessboard distance to the outside: the number of 3x3 erosions a pixel survives."""
    m = torch.from_numpy(inside.astype(np.float32))[None, None]
    d = torch.zeros_like(m)
    while m.any():
        d += m
        m = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return d[0, 0].numpy()


SIGMA = 0.3  # bump width: 0.3 x the object's equivalent radius
THRESHOLDS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]


def cam_like(gt: np.ndarray, keys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``K x H x W`` maps shaped like CAMs: per class, a bump on one random interior point of each
    of its regions (the discriminative part), as wide as half the region, weaker outside the
    object (spill), plus weak background noise; max-normalised per class as the CAM stage does."""
    yy, xx = np.mgrid[0 : gt.shape[0], 0 : gt.shape[1]]
    maps = []
    for k in keys:
        inside = gt == k + 1
        depth = _depth(inside)
        core = np.argwhere(depth >= max(1.0, 0.5 * float(depth.max())))
        cy, cx = core[rng.integers(len(core))]
        sigma = SIGMA * math.sqrt(inside.sum() / math.pi)
        bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        m = bump * (0.35 + 0.65 * _blur(inside.astype(np.float32), sigma=1.0)) + 0.05 * _blur(rng.random(gt.shape), 2.0)
        maps.append(m / m.max())
    return np.stack(maps).astype(np.float32)


def miou(ds, pairs) -> float:
    cm = ConfusionMatrix(ds.num_classes)
    for gt, pred in pairs:
        cm.update(gt, pred)
    return cm.miou


def best_seeds(ds, items):
    """``(threshold, mIoU)`` of the best seeds on the sweep (chosen with ground truth, as the DAG)."""
    scores = {t: miou(ds, [(gt, cam_to_label(cam, keys, t)) for _, gt, keys, cam in items]) for t in THRESHOLDS}
    t = max(scores, key=scores.get)
    return t, scores[t]


#: Objects at least this large (16 cells of IRN's stride-4 maps) for the IRN comparison.
MIN_OBJECT_PIXELS = 256


def controlled_set(root: Path, n_images: int, seed: int = 0):
    """``(dataset, config, [(image, gt, keys, cam-like maps)])`` for ``n_images`` validation images
    generated under ``root`` with the ``hard`` preset's geometry (small objects too; the figures in
    the README and tests/test_refinement_order.py were measured on it)."""
    generate_synthetic(root, preset="hard", seed=seed, n_train_aug=4, n_train=2, n_val=n_images)
    cfg = validate_config({"dataset": {"root": str(root)}})
    ds = open_dataset(cfg)
    rng = np.random.default_rng(seed)
    items = []
    for image_id in ds.ids("val"):
        gt = ds.load_mask(image_id)
        keys = np.array(sorted(int(c) - 1 for c in np.unique(gt) if 0 < c < 255), dtype=np.int64)
        if len(keys):
            items.append((ds.load_image(image_id), gt, keys, cam_like(gt, keys, rng)))
    return ds, cfg, items


def large_objects_only(items):
    return [it for it in items if all((it[1] == k + 1).sum() >= MIN_OBJECT_PIXELS for k in it[2])]


def crf_miou(ds, cfg, items, threshold: float) -> float:
    resolved = crf_settings(crf_params_for_seeds(cfg["crf"], threshold))
    return miou(ds, [(gt, crf_mask(img, cam, keys, resolved)) for img, gt, keys, cam in items])


def irn_walk_miou(ds, cfg, items) -> float:
    p = IRNInferParams.from_mapping(cfg["irn"]["infer"])
    preds = []
    for _, gt, keys, cam in items:
        h, w = gt.shape
        hs, ws = math.ceil(h / STRIDE), math.ceil(w / STRIDE)
        strided = F.interpolate(torch.from_numpy(cam)[None], size=(hs, ws), mode="area")[0]
        rw = random_walk(strided, outline_boundary_map(gt), p.radius, p.beta, p.steps_exponent((hs, ws)), method=p.walk)
        preds.append((gt, sem_seg_from_walk(rw, keys, (h, w), p.bg_thresh)[0]))
    return miou(ds, preds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=40)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ds, cfg, items = controlled_set(Path(tmp) / "synthetic", args.images)
        for name, subset in (("all images", items), (f"objects >= {MIN_OBJECT_PIXELS} px", large_objects_only(items))):
            t, seeds = best_seeds(ds, subset)
            print(
                f"{name} ({len(subset)}): seeds {100 * seeds:.1f} (threshold {t}) | +CRF {100 * crf_miou(ds, cfg, subset, t):.1f}"
                f" | IRN walk on true outlines {100 * irn_walk_miou(ds, cfg, subset):.1f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
