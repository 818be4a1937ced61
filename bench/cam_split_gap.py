"""Where do a run's CAMs and IR labels go wrong? Seeds per split and per number of classes, and how
much of the background the CAMs and the IR labels call foreground.

For a finished run of the workflow (its CAM shards and, if given, its IR-label folder) and the
dataset it ran on, this prints:

* the seed mIoU (CAMs thresholded at ``--threshold``, the run's chosen one) on each ``--splits``
  entry, over all images and over the images with 1, 2 and 3 or more image-level classes: whether
  a split's score comes from its share of single-class images;
* on each split, the fraction of ground-truth background pixels whose CAM is above the threshold
  (raw CAM foreground) and, with ``--ir-labels``, the fractions of background pixels that are
  confident foreground and of object pixels that are confident foreground / confident background /
  ignored in the IR labels: what IRN's boundary network is told to enclose;
* with ``--masks``, the mIoU and per-class IoU of each pseudo-mask folder (CRF, IRN, ...) on each
  split: the masks DeepLab trains on are those of ``train_aug``, not of the evaluation split.

Ground truth enters only this diagnostic. Run from the directory the workflow ran in, e.g.::

    python bench/cam_split_gap.py --data data/synthetic --cams results/synthetic/baseline/s0/cams/*.h5 \\
        --ir-labels results/synthetic/baseline/s0/irn/ir_labels/masks-* --threshold 0.35 \\
        --masks crf=results/synthetic/baseline/s0/crf/masks-* irn=results/synthetic/baseline/s0/irn/masks/masks-*
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from wsss.cams import CamStore
from wsss.config import validate_config
from wsss.data import open_dataset
from wsss.io import read_label_png
from wsss.metrics import ConfusionMatrix
from wsss.seeds import cam_to_label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset root of the synthetic (or VOC-layout) dataset")
    ap.add_argument("--dataset", default="synthetic", help="dataset.name (synthetic | voc12)")
    ap.add_argument("--cams", nargs="+", required=True, help="the run's CAM shard files")
    ap.add_argument("--ir-labels", default=None, help="the run's IR-label folder (irn/ir_labels/masks-<hash>)")
    ap.add_argument("--threshold", type=float, required=True, help="seed background threshold")
    ap.add_argument("--splits", nargs="+", default=["train_aug", "val"])
    ap.add_argument("--masks", nargs="+", default=[], help="NAME=FOLDER pseudo-mask folders to evaluate on each split")
    args = ap.parse_args()
    masks = dict(m.split("=", 1) for m in args.masks)
    if any(not name or not folder for name, folder in masks.items()):
        ap.error(f"--masks takes NAME=FOLDER entries, got {args.masks}")

    cfg = validate_config({"dataset": {"name": args.dataset, "root": args.data}}, extra_checks=False)
    ds = open_dataset(cfg)
    with CamStore(args.cams) as store:
        for split in args.splits:
            ids = [i for i in ds.ids(split) if i in store]
            if not ids:
                raise SystemExit(f"no image of split {split!r} has a CAM in the given shards")
            by_count = {"all": ConfusionMatrix(ds.num_classes)}
            counts = {}
            bg = bg_cam_fg = obj = 0
            ir = np.zeros(4, np.int64)  # bg called fg, obj fg, obj bg, obj ignored
            mask_cms = {name: ConfusionMatrix(ds.num_classes) for name in masks}
            for i in ids:
                rec = store.get(i, ("keys", "high_res"))
                gt = ds.load_mask(i)
                pred = cam_to_label(rec.high_res, rec.keys, args.threshold)
                n = min(len(rec.keys), 3)
                counts[n] = counts.get(n, 0) + 1
                for key in ("all", n):
                    by_count.setdefault(key, ConfusionMatrix(ds.num_classes)).update(gt, pred)
                is_bg, is_obj = gt == 0, (gt > 0) & (gt < 255)
                bg += int(is_bg.sum())
                obj += int(is_obj.sum())
                bg_cam_fg += int((is_bg & (pred > 0)).sum())
                for name, folder in masks.items():
                    mask_cms[name].update(gt, read_label_png(Path(folder) / f"{i}.png"))
                if args.ir_labels:
                    lab = read_label_png(Path(args.ir_labels) / f"{i}.png")
                    conf_fg = (lab > 0) & (lab < 255)
                    ir += [
                        (is_bg & conf_fg).sum(),
                        (is_obj & conf_fg).sum(),
                        (is_obj & (lab == 0)).sum(),
                        (is_obj & (lab == 255)).sum(),
                    ]
            parts = [f"all {100 * by_count['all'].miou:.1f} ({len(ids)} images)"]
            for n in (1, 2, 3):
                if n in counts:
                    label = f"{n}+" if n == 3 else str(n)
                    parts.append(f"{label} class(es) {100 * by_count[n].miou:.1f} ({counts[n]})")
            print(f"{split}: seed mIoU at {args.threshold}: " + ", ".join(parts))
            line = f"{split}: background pixels with CAM above {args.threshold}: {100 * bg_cam_fg / bg:.1f} %"
            if args.ir_labels:
                line += (
                    f"; IR labels: background confident fg {100 * ir[0] / bg:.1f} %, object pixels confident fg "
                    f"{100 * ir[1] / obj:.1f} % / confident bg {100 * ir[2] / obj:.1f} % / ignored {100 * ir[3] / obj:.1f} %"
                )
            print(line)
            for name, cm in mask_cms.items():
                per_class = " ".join(f"{c} {100 * v:.1f}" for c, v in zip(ds.class_names, cm.iou()))
                print(f"{split}: {name} masks mIoU {100 * cm.miou:.1f} | {per_class}")


if __name__ == "__main__":
    main()
