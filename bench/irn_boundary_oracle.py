"""Is a run's IRN limited by its boundary map or by the CAMs it walks? Three walks side by side.

For every image of ``dataset.eval_split`` of a finished run, IRN's random walk (the run's
``irn.infer`` settings) propagates the run's stride-4 CAMs over three boundary maps:

* **learned**: the run's trained IRN, i.e. the workflow's IRN masks;
* **true outlines**: the ground-truth object outlines
  (:func:`wsss.refine.random_walk.outline_boundary_map`), what a perfect boundary network gives;
* **none**: a zero boundary map (the CAMs diffuse freely over the image).

It prints the mIoU, the mean precision and the per-class IoU of each next to the run's seeds (the
threshold chosen on the sweep), at the run's walk background threshold or at each ``--bg-thresh``, and with the run's number of
walk steps or 2^(n + delta) for each ``--steps-delta``. Where the true outlines lift the masks far above the learned
boundaries, better boundary training pays; where they stay near the seeds, the CAMs limit IRN
(classes whose CAM fires on the wrong region keep their low precision however good the outlines
are). Ground truth enters only this diagnostic, never the workflow. Needs the run's CAM shards and
``irn/model.pt``; run from the directory the workflow ran in::

    python bench/irn_boundary_oracle.py --configfile config.yaml my.yaml --run baseline/s0

``--scale 2`` walks on the stride-4 grid of the image enlarged twice (CAMs resized bilinearly to
it, the image resized bilinearly for the learned map, the ground truth by nearest neighbour for the
outlines, labels resized back by nearest neighbour): how much the stride-4 resolution of IRN's
walk costs on small images. The run's IRN was trained at scale 1, so its learned map at another
scale is off its training distribution.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.cams import CamStore
from wsss.config import deep_merge, load_config_file, run_config, validate_config
from wsss.data import open_dataset
from wsss.data.transforms import resize
from wsss.metrics import ConfusionMatrix
from wsss.refine.irn import boundary_map, load_irn
from wsss.refine.irn_params import STRIDE, IRNInferParams
from wsss.refine.random_walk import outline_boundary_map, random_walk, sem_seg_from_walk

WALKS = ("learned", "true outlines", "none")


def chosen_seeds(sweep_csv: Path) -> dict:
    """The row of ``seeds/threshold_sweep.csv`` marked ``chosen_with_gt``."""
    with open(sweep_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("chosen_with_gt") == "True"]
    if len(rows) != 1:
        raise ValueError(f"{sweep_csv}: expected one row with chosen_with_gt True, found {len(rows)}")
    return rows[0]


def walk_confusions(
    ds,
    store: CamStore,
    irn_model: Path,
    params: IRNInferParams,
    split: str,
    bg_thresholds,
    scale: float = 1.0,
    steps_deltas=(0,),
):
    """``{(walk name, steps delta, background threshold): ConfusionMatrix}`` over the ``split``
    images (see the module docstring); the walk runs once per boundary map and steps delta (2^(n +
    delta) steps, n = the run's exponent for the map size), the labels once per threshold; at
    ``scale`` != 1 on the image enlarged that much (module docstring)."""
    method = load_irn(irn_model, torch.device("cpu"))
    cms = {(name, d, t): ConfusionMatrix(ds.num_classes) for name in WALKS for d in steps_deltas for t in bg_thresholds}
    for image_id in ds.ids(split):
        rec = store.get(image_id, fields=("keys", "cam"))
        img, gt = ds.load_image(image_id), ds.load_mask(image_id)
        h, w = gt.shape
        size = (round(h * scale), round(w * scale))
        strided = (math.ceil(size[0] / STRIDE), math.ceil(size[1] / STRIDE))
        keys = np.asarray(rec.keys, dtype=np.int64).reshape(-1)
        if len(keys) == 0:
            for cm in cms.values():
                cm.update(gt, np.zeros_like(gt))
            continue
        cam = torch.from_numpy(np.asarray(rec.cam, np.float32))
        walk_img, walk_gt = img, gt
        if size != (h, w):
            cam = F.interpolate(cam[None], size=strided, mode="bilinear", align_corners=False)[0]
            walk_img = resize(np.asarray(img, np.uint8), size, Image.BILINEAR)
            walk_gt = resize(np.asarray(gt, np.uint8), size, Image.NEAREST)
        edges = {
            "learned": boundary_map(method, walk_img, params.pad_to, torch.device("cpu")),
            "true outlines": outline_boundary_map(walk_gt),
            "none": torch.zeros(strided),
        }
        for (name, edge), d in itertools.product(edges.items(), steps_deltas):
            exponent = max(0, params.steps_exponent(strided) + d)
            rw = random_walk(cam, edge.float(), params.radius, params.beta, exponent, method=params.walk)
            for t in bg_thresholds:
                labels = sem_seg_from_walk(rw, keys, size, t)[0]
                if size != (h, w):
                    labels = resize(labels.astype(np.uint8), (h, w), Image.NEAREST)
                cms[(name, d, t)].update(gt, labels)
    return cms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--configfile", nargs="+", default=["config.yaml"], help="config files, merged in order (as snakemake)"
    )
    ap.add_argument("--run", default="baseline/s0", help="<experiment>/s<seed>")
    ap.add_argument("--results", default="results", help="the workflow's results folder")
    ap.add_argument(
        "--bg-thresh",
        type=float,
        nargs="+",
        help="walk background thresholds to compare (default: the run's irn.infer.bg_thresh)",
    )
    ap.add_argument(
        "--scale", type=float, default=1.0, help="walk on the image enlarged this much (1: the workflow's walk)"
    )
    ap.add_argument(
        "--steps-delta",
        type=int,
        nargs="+",
        default=[0],
        help="walk 2^(n + delta) steps, n = the run's exponent (irn.infer exp_times / walk_size); default 0",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.scale <= 0:
        ap.error(f"--scale must be positive, got {args.scale:g}")
    torch.set_num_threads(args.threads)

    raw: dict = {}
    for path in args.configfile:
        raw = deep_merge(raw, load_config_file(path))
    cfg = run_config(validate_config(raw), args.run)
    ds = open_dataset(cfg)
    run_dir = Path(args.results) / cfg["dataset"]["name"] / args.run
    shards = sorted((run_dir / "cams").glob("shard-*-of-*.h5"))
    if not shards:
        raise FileNotFoundError(f"no CAM shards in {run_dir / 'cams'}: run the workflow up to the IRN masks first")
    params = IRNInferParams.from_mapping(cfg["irn"]["infer"])
    split = cfg["dataset"]["eval_split"]
    thresholds = args.bg_thresh or [params.bg_thresh]
    cms = walk_confusions(
        ds,
        CamStore(shards),
        run_dir / "irn" / "model.pt",
        params,
        split,
        thresholds,
        scale=args.scale,
        steps_deltas=args.steps_delta,
    )

    seeds = chosen_seeds(run_dir / "seeds" / "threshold_sweep.csv")
    names = ds.class_names
    n_images = next(iter(cms.values())).num_images
    at = f", walks at scale {args.scale:g}" if args.scale != 1 else ""
    print(f"{args.run} on {split} ({n_images} images{at}), mIoU / mean precision / per-class IoU, in %:")
    per_class = " ".join(f"{n} {100 * float(seeds[f'iou.{n}']):.1f}" for n in names)
    print(
        f"  seeds (threshold {float(seeds['threshold']):g}, the run's sweep on {seeds.get('split', '?')}): {100 * float(seeds['miou']):.1f} / {100 * float(seeds['mean_precision']):.1f} | {per_class}"
    )
    for (name, d, t), cm in cms.items():
        iou = cm.iou()
        per_class = " ".join(f"{n} {100 * v:.1f}" for n, v in zip(names, iou))
        steps = f" steps 2^(n{d:+d})," if args.steps_delta != [0] else ""
        print(
            f"  IRN walk, {name + ',':14s}{steps} threshold {t:g}: {100 * cm.miou:.1f} / {100 * cm.mean_precision:.1f} | {per_class}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
