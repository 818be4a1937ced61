"""Benchmark: IRN random walk, dense reference formulation vs the sparse (stencil) one.

Default size = a VOC image of 500 x 375 at stride 4 (125 x 94 map, N = 11,750 pixels), K = 3
classes, radius 5, beta 10, exp_times 8 (256 steps) — the IRN inference defaults
(``step/make_sem_seg_labels.py`` of jiwoon-ahn/irn); cost of the dense reference: docs/irn.md,
"Deviations from the reference", item 1.

Each variant runs in a fresh Python process (``--worker``), so its memory figure is its own:
peak memory = growth of the process's peak resident set size (``resource.getrusage(RUSAGE_SELF)
.ru_maxrss`` after the walk minus before it, inputs already allocated). ``tracemalloc`` cannot be
used: it sees only Python's allocator, not torch's C allocations. Time = wall clock of the walk
(``time.perf_counter``), inputs and imports excluded. The parent prints both, the speed ratio,
and the difference of the two outputs (max |Δ| after global-max normalisation, and whether the
label maps of ``sem_seg_from_walk`` are identical).

    python bench/random_walk.py                 # dense (minutes, ~3 GB) + sparse
    python bench/random_walk.py --skip-dense    # sparse only
    python bench/random_walk.py --threads 2     # torch intra-op threads of the workers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_inputs(h: int, w: int, k: int, seed: int):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    # smooth random CAMs in [0, 1] and a boundary map with thin ridges (content does not change
    # the cost, but keeps the walk's output non-trivial for the comparison)
    cam = F.interpolate(
        torch.rand(1, k, h // 8 + 1, w // 8 + 1, generator=g), size=(h, w), mode="bilinear", align_corners=False
    )[0]
    edge = torch.rand(h, w, generator=g) ** 8
    return cam.contiguous(), edge.contiguous()


def worker(args) -> None:
    import numpy as np
    import torch

    from wsss.refine.random_walk import random_walk_dense, random_walk_sparse

    torch.set_num_threads(args.threads)
    cam, edge = make_inputs(args.height, args.width, args.classes, args.seed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.worker == "dense":
        rw = random_walk_dense(cam, edge, args.radius, args.beta, args.exp_times)
    elif args.worker == "sparse":
        rw = random_walk_sparse(cam, edge, args.radius, args.beta, args.exp_times)
    elif args.worker == "sparse-fp32":
        rw = random_walk_sparse(cam, edge, args.radius, args.beta, args.exp_times, dtype=None)
    else:
        raise SystemExit(f"unknown worker {args.worker!r}")
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(args.out, rw.numpy())
    print(
        json.dumps(
            {
                "variant": args.worker,
                "seconds": seconds,
                "peak_mb": (after - before) / 1024.0,
                "threads": torch.get_num_threads(),
            }
        )
    )


def run_variant(name: str, args, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--out", str(out)] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("height", "width", "classes", "radius", "beta", "exp_times", "threads", "seed")
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=94)
    ap.add_argument("--width", type=int, default=125)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--radius", type=int, default=5)
    ap.add_argument("--beta", type=float, default=10.0)
    ap.add_argument("--exp-times", type=int, default=8)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import numpy as np
    import torch

    from wsss.refine.random_walk import sem_seg_from_walk

    n = args.height * args.width
    print(
        f"random walk: map {args.height}x{args.width} (N = {n}), K = {args.classes}, radius {args.radius}, "
        f"beta {args.beta}, 2^{args.exp_times} = {2**args.exp_times} steps, torch threads {args.threads}"
    )
    variants = ["sparse", "sparse-fp32"] + ([] if args.skip_dense else ["dense"])
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            out = Path(tmp) / f"{v}.npy"
            results[v] = run_variant(v, args, out)
            outputs[v] = np.load(out)
            r = results[v]
            print(f"  {v:12s} {r['seconds']:10.3f} s   peak memory +{r['peak_mb']:9.1f} MB")
    if "dense" in results:
        d, s = results["dense"], results["sparse"]
        print(
            f"  speed-up sparse vs dense: {d['seconds'] / s['seconds']:.0f}x; memory "
            f"{d['peak_mb']:.0f} MB -> {s['peak_mb']:.1f} MB"
        )
        keys = list(range(args.classes))
        size = (args.height * 4, args.width * 4)
        ref = outputs["dense"] / outputs["dense"].max()
        ref_labels, _ = sem_seg_from_walk(torch.from_numpy(outputs["dense"]), keys, size)
        for v in ("sparse", "sparse-fp32"):
            diff = np.abs(outputs[v] / outputs[v].max() - ref).max()
            labels, _ = sem_seg_from_walk(torch.from_numpy(outputs[v]), keys, size)
            same = np.mean(labels == ref_labels)
            print(
                f"  {v} vs dense: max |diff| of normalised scores {diff:.2e}; labels identical on "
                f"{100 * same:.4f}% of {labels.size} pixels"
            )


if __name__ == "__main__":
    main()
