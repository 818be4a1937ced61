"""Benchmark: how many threads each kind of job should use (the thread policy of wsss.workflow.threads).

Every CPU stage of the workflow is one of four kinds of work. Each is measured in fresh Python
processes (``--worker``) with 1 and 2 torch/OpenMP/BLAS threads, once **alone** and once with
**a second identical process running at the same time** (what Snakemake does with ``--cores 2``
and two 1-thread jobs, or any job beside another on a busy node):

* ``train``: one classifier training step (ResNet-18 CAM, batch 8, 256 x 256 crops, SGD);
* ``cam``: multi-scale CAM inference of one 500 x 375 image (scales 1, 0.5, 1.5, 2 with flips);
* ``walk``: IRN's sparse random walk on a 125 x 94 map (500 x 375 at stride 4), 3 classes, 256 steps;
* ``crf``: one PSA dense CRF (21 labels would be VOC's worst case; 4 labels here) on 500 x 375.

It prints seconds per item and the machine's throughput (items/s) for the two ways of spending 2
cores: one job with 2 threads, or two jobs with 1 thread each. The policy in
``wsss/workflow/threads.py`` follows these figures (README, "Threads").

    python bench/threads.py                  # all four (about 3 min on 2 idle cores)
    python bench/threads.py --kinds walk crf
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("train", "cam", "walk", "crf")


def workload(kind: str):
    """A zero-argument callable doing one item of ``kind`` (inputs built once, outside the timing)."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(0)
    if kind in ("train", "cam"):
        from wsss.methods import build_method
        from wsss.models import build_backbone

        method = build_method("cam", num_classes=4, backbone=build_backbone("resnet18", pretrained="none"))
        if kind == "train":
            opt = torch.optim.SGD(method.parameters(), lr=0.01)
            batch = {"image": torch.randn(8, 3, 256, 256, generator=g), "label": torch.ones(8, 4)}

            def step():
                opt.zero_grad()
                loss = sum(method.losses(batch, None).values())
                loss.backward()
                opt.step()

            return step
        from wsss.cam_infer import fused_cams
        from wsss.data.transforms import multiscale_views

        method.eval().to(memory_format=torch.channels_last)  # cam.channels_last, the default
        img = (np.random.default_rng(0).random((375, 500, 3)) * 255).astype(np.uint8)
        keys = np.array([0, 2])

        def infer():
            views = [torch.from_numpy(v) for v in multiscale_views(img, (1.0, 0.5, 1.5, 2.0), True)]
            fused_cams(method, views, (375, 500), keys, "max", torch.device("cpu"), channels_last=True)

        return infer
    if kind == "walk":
        from wsss.refine.random_walk import random_walk_sparse

        cam = torch.rand(3, 94, 125, generator=g)
        edge = torch.rand(94, 125, generator=g) ** 8
        # cpu_threads=None: the walk runs with the process's threads (what is measured here)
        return lambda: random_walk_sparse(cam, edge, beta=10, exp_times=8, radius=5, cpu_threads=None)
    if kind == "crf":
        from wsss.refine.crf import crf_with_alpha

        rng = np.random.default_rng(0)
        img = (rng.random((375, 500, 3)) * 255).astype(np.uint8)
        cams = rng.random((3, 375, 500)).astype(np.float32)
        return lambda: crf_with_alpha(img, cams, np.array([0, 1, 2]), alpha=4)
    raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")


def worker(kind: str, threads: int, repeats: int) -> None:
    from wsss.workflow.threads import limit_threads

    limit_threads(threads)
    fn = workload(kind)
    fn()  # warm-up (allocations, lazy init)
    print("ready", flush=True)
    sys.stdin.readline()  # the processes of a pair start their timed part together
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times)}))


def measure(kind: str, threads: int, concurrent: int, repeats: int) -> float:
    """Median seconds per item of one process when ``concurrent`` identical processes run together."""
    cmd = [sys.executable, __file__, "--worker", kind, str(threads), str(repeats)]
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(concurrent)
    ]
    for p in procs:  # every process imported and warmed up
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"worker {kind} threads={threads} failed before its warm-up ended")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker {kind} threads={threads} failed (exit {p.returncode})")
        outs.append(json.loads(out.strip().splitlines()[-1])["median_s"])
    return max(outs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "THREADS", "REPEATS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        kind, threads, repeats = a.worker
        worker(kind, int(threads), int(repeats))
        return 0
    print(
        f"{'kind':<6} {'1 thr alone':>12} {'2 thr alone':>12} {'1 thr x2 procs':>15} {'2 thr x2 procs':>15}"
        f"   {'1 job x 2 thr':>14} {'2 jobs x 1 thr':>15}  (items/s)"
    )
    for kind in a.kinds:
        t11 = measure(kind, 1, 1, a.repeats)
        t21 = measure(kind, 2, 1, a.repeats)
        t12 = measure(kind, 1, 2, a.repeats)
        t22 = measure(kind, 2, 2, a.repeats)
        print(
            f"{kind:<6} {t11:>11.3f}s {t21:>11.3f}s {t12:>14.3f}s {t22:>14.3f}s   {1 / t21:>14.3f} {2 / t12:>15.3f}",
            flush=True,
        )
    print(
        "s/item: median of --repeats items per process; 'x2 procs': two identical processes at once "
        "(the slower one's median). Throughput: 1 job x 2 threads = 1 / (2 thr alone); "
        "2 jobs x 1 thread = 2 / (1 thr x2 procs)."
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
