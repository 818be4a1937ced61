"""Benchmark: DataLoader workers beside CPU training (the ``torch`` job kind of wsss.workflow.threads).

A CPU training job of ``--threads`` cores either computes with all of them and loads its batches in
the main process (0 workers, the policy), or keeps the torch threads and adds ``threads - 1``
loader workers (oversubscribed, the previous behaviour). Measured on the classifier training of
the workflow (``wsss.pipeline.train_classifier``, the default recipe's augmentation) over
``--images`` generated images of VOC's size (synthetic ``voc_scale``), one epoch each, after a
warm-up epoch; prints seconds per image for both.

    python bench/loader_workers.py                # 32 images, 2 threads
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    import torch
    import yaml

    import wsss.pipeline as pipeline
    from wsss.config import run_config, run_names, validate_config
    from wsss.data import open_dataset
    from wsss.data.base import write_labels_csv
    from wsss.data.synthetic import generate_synthetic
    from wsss.workflow.threads import limit_threads

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "voc_scale"
        generate_synthetic(root, preset="voc_scale", seed=0, progress=False, n_train_aug=a.images, n_train=4, n_val=4)
        raw = yaml.safe_load((REPO / "config.yaml").read_text())
        raw["dataset"] = {**raw["dataset"], "root": str(root)}
        raw["synthetic"] = {"preset": "voc_scale"}
        raw["classifier"].update({"epochs": 1, "batch_size": 8})
        cfg = validate_config(raw)
        cfg = run_config(cfg, run_names(cfg)[0])
        labels = Path(tmp) / "labels.csv"
        ds = open_dataset(cfg)
        ids = ds.ids(cfg["dataset"]["train_split"])
        write_labels_csv(labels, ids, {i: ds.labels(i) for i in ids}, ds.class_names)
        results = {}
        for workers in (0, a.threads - 1, 0, a.threads - 1):

            def fixed(threads, w=workers):
                limit_threads(a.threads)
                return torch.device("cpu"), w

            pipeline.device_and_workers = fixed
            out = Path(tmp) / f"run{workers}"
            t0 = time.perf_counter()
            pipeline.train_classifier(cfg, str(labels), str(out / "model.pt"), str(out / "work"), progress=False)
            results.setdefault(workers, []).append((time.perf_counter() - t0) / a.images)
            shutil.rmtree(out)
    print(f"CPU training, {a.threads} torch threads, {a.images} images of ~500x375, batch 8, one epoch:")
    for w, t in results.items():
        print(f"  {w} loader workers: {min(t):.3f} s / image (best of {len(t)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
