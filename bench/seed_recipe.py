"""Quick check of a classifier recipe: train, CAMs of the evaluation split only, seed sweep.

The DAG computes CAMs for train_aug and val (IR labels, IRN and DeepLab need them); comparing
classifier recipes needs only the seeds on ``val``, so this script trains the classifier of a
config (``config.yaml`` plus the given overrides) and prints the best seed mIoU of the sweep with
its per-class IoU, in a few minutes on 2 CPU cores. The numbers are the DAG's: the same
``wsss.pipeline.train_classifier``, ``wsss.cam_infer.infer_cams`` and ``wsss.seeds`` code.

    python bench/seed_recipe.py --data data/synthetic --labels results/synthetic/labels.csv \\
        --out /tmp/recipes/ep30 --set '{"classifier": {"epochs": 30}}'

``--data``: an existing dataset root (e.g. the default run's ``data/synthetic``); ``--labels``: its
image-level labels CSV (rule ``image_labels``). A finished training in ``--out`` is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

THRESHOLDS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset root (dataset.root)")
    ap.add_argument("--labels", required=True, help="image-level labels CSV of that dataset")
    ap.add_argument("--out", required=True, help="folder for the model, its log and the CAMs")
    ap.add_argument(
        "--set", default="{}", help='JSON overrides of config.yaml, e.g. \'{"classifier": {"epochs": 30}}\''
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from wsss.cam_infer import infer_cams
    from wsss.cams import CamStore
    from wsss.config import deep_merge, run_config, validate_config
    from wsss.data import open_dataset
    from wsss.data.base import read_labels_csv
    from wsss.pipeline import load_classifier, train_classifier
    from wsss.seeds import sweep_thresholds

    raw = deep_merge(yaml.safe_load((REPO / "config.yaml").read_text()), json.loads(args.set))
    raw = deep_merge(raw, {"dataset": {"root": args.data}})
    cfg = validate_config(raw)
    cfg = run_config(cfg, f"{sorted(cfg['experiments'])[0]}/s{cfg['seeds'][0]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (out / "model.pt").exists():
        train_classifier(cfg, args.labels, str(out / "model.pt"), str(out / "work"), threads=args.threads)
    t_train = time.time() - t0
    ds = open_dataset(cfg)
    labels = read_labels_csv(args.labels, ds.class_names)
    method = load_classifier(cfg, str(out / "model.pt"), ds.num_fg_classes)
    ids = ds.ids(cfg["dataset"]["eval_split"])
    c = cfg["cam"]
    cams = out / "eval_cams.h5"
    cams.unlink(missing_ok=True)
    t0 = time.time()
    infer_cams(
        method, ds, ids, labels, cams, scales=c["scales"], flip=c["flip"], normalisation=c["normalisation"],
        resolved_config={}, upsample=c["upsample"], channels_last=c["channels_last"], progress=False,
    )  # fmt: skip
    t_cam = time.time() - t0
    cms = sweep_thresholds(CamStore([cams]), ds, ids, THRESHOLDS, progress=False)
    scores = {t: cm.summary(ds.class_names) for t, cm in cms.items() if t != float("inf")}
    best = max(scores, key=lambda t: scores[t]["miou"])
    s = scores[best]
    per_class = {k[4:]: round(100 * v, 1) for k, v in s.items() if k.startswith("iou.")}
    print(
        f"{out.name}: seed mIoU {100 * s['miou']:.1f} at threshold {best} (chosen with ground truth), precision "
        f"{100 * s['mean_precision']:.1f}, recall {100 * s['mean_recall']:.1f} | "
        f"train {t_train:.0f} s, CAMs {t_cam:.0f} s | per class {per_class}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
