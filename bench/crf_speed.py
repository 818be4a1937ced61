"""Time per image of each dense-CRF flavour at VOC size (375x500), single thread.

    python bench/crf_speed.py [--repeat 3]

Each line gives the time of one call (median over ``--repeat`` calls after a warm-up) of the wsss
wrapper, of the bare pydensecrf calls on a prepared unary (the same inference without the wrapper's
checks and array handling), and of the wrapper alone with the CRF inference stubbed out (its
per-image overhead: input checks, unary, argmax). Times are CPU time of this process (pydensecrf is
single-threaded, so this is the uncontended wall time even on a busy machine); the wall-clock median
of the wrapper is printed too. Numbers go into docs/crf.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from wsss.refine import crf as crfmod
from wsss.refine.crf import crf_inference_label, crf_seed_threshold, crf_with_alpha, deeplab_crf

H, W = 375, 500


def timed_ms(fn, repeat: int) -> tuple[float, float]:
    """(CPU, wall) median time of ``fn()`` in ms after one warm-up call."""
    fn()
    cpu, wall = [], []
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return 1000 * float(np.median(cpu)), 1000 * float(np.median(wall))


def _stub_crf(img, unary, n_labels, *args):
    return np.full((n_labels, img.shape[0], img.shape[1]), 1.0 / n_labels, np.float32)


def overhead_ms(fn, repeat: int) -> float:
    """Best time of ``fn()`` with the CRF inference replaced by a constant (the wrapper's own work)."""
    real = crfmod._dense_crf
    crfmod._dense_crf = _stub_crf
    try:
        return timed_ms(fn, max(repeat, 5))[0]
    finally:
        crfmod._dense_crf = real


def row(name: str, fn, bare_fn, repeat: int) -> None:
    cpu, wall = timed_ms(fn, repeat)
    bare_cpu = f"{timed_ms(bare_fn, repeat)[0]:9.0f}" if bare_fn is not None else f"{'':>9s}"
    print(f"{name:40s} {cpu:9.0f} {wall:9.0f} {bare_cpu} {overhead_ms(fn, repeat):9.1f}")


def bare(img, unary, n, t, g_sxy, g_c, b_sxy, b_srgb, b_c):
    d = dcrf.DenseCRF2D(W, H, n)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=g_sxy, compat=g_c)
    d.addPairwiseBilateral(sxy=b_sxy, srgb=b_srgb, rgbim=img, compat=b_c)
    return np.asarray(d.inference(t))


def scene(rng, k):
    """A smooth RGB image with k rectangles of other colours, and CAM blobs that bleed over them."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.stack([80 + 60 * np.sin(xx / 90), 120 + 40 * np.cos(yy / 70), 100 + 0 * xx], -1)
    cams = np.zeros((k, H, W), np.float32)
    for c in range(k):
        y0, x0 = 40 + 90 * c, 60 + 120 * c
        img[y0 : y0 + 150, x0 : x0 + 180] = rng.integers(0, 255, 3)
        cy, cx = y0 + 75, x0 + 90
        cams[c] = np.exp(-(((yy - cy) / 90) ** 2 + ((xx - cx) / 110) ** 2))
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    cams /= cams.reshape(k, -1).max(1)[:, None, None]
    return img, cams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(
        f"{H}x{W}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread, {args.repeat} timed calls each"
    )
    print(f"{'ms / image (median)':40s} {'wsss cpu':>9s} {'wsss wall':>9s} {'bare cpu':>9s} {'overhead':>9s}")
    for k in (1, 2, 3):
        img, cams = scene(rng, k)
        keys = np.arange(k)
        stack = np.concatenate([(1 - cams.max(0, keepdims=True)) ** 9, cams])
        u = unary_from_softmax(stack)
        row(
            f"crf_with_alpha  (K={k}, {k + 1} labels)",
            lambda: crf_with_alpha(img, cams, keys, 9),
            lambda: bare(img, u, k + 1, 10, 3, 3, 80, 13, 10),
            args.repeat,
        )
    for k in (1, 2):
        img, cams = scene(rng, k)
        seed = np.concatenate([np.full((1, H, W), 0.3, np.float32), cams]).argmax(0)
        u = unary_from_labels(seed, k + 1, gt_prob=0.7, zero_unsure=False)
        row(
            f"crf_inference_label ({k + 1} labels)",
            lambda: crf_inference_label(img, seed, k + 1),
            lambda: bare(img, u, k + 1, 10, 3, 3, 50, 5, 10),
            args.repeat,
        )
        row(
            f"crf_seed_threshold (K={k}, {k + 1} labels)",
            lambda: crf_seed_threshold(img, cams, np.arange(k), 0.3),
            None,
            args.repeat,
        )
    img, _ = scene(rng, 3)
    logits = rng.normal(0, 1, (21, H, W)).astype(np.float32)
    logits[0] += 2
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    u = unary_from_softmax(probs)
    row(
        "deeplab_crf (21 labels)",
        lambda: deeplab_crf(img, probs),
        lambda: bare(img, u, 21, 10, 1, 3, 67, 3, 4),
        args.repeat,
    )


if __name__ == "__main__":
    main()
