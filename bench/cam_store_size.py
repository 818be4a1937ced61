"""Size and speed of the HDF5 CAM store against IRN-style float32 .npy files.

Generates CAM-like maps at VOC size (375 x 500, K = 1..3 classes, seeded) the way IRN's make_cam
produces them: a smooth stride-16 score map (random coarse blobs plus finer stride-16 detail, both
bilinearly upsampled), ReLU'd, bilinearly resized to the stride-4 ``cam`` and the full-resolution
``high_res``, each class divided by its max. So most pixels are 0 or near it and a few blobs reach 1.

Writes them with :class:`wsss.cams.CamShardWriter` at each gzip level and as float32 ``.npy``
(``cam`` + ``high_res`` per image), then prints bytes per image, the size ratio, and write and
random-read time per image. Exits with status 1 if the store at the default level is larger than
1/4 of the .npy files.

    python bench/cam_store_size.py [--num-images 100] [--levels 1 4 9] [--seed 0] [--active 0.1 0.4]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss.cams import DEFAULT_GZIP_LEVEL, CamShardWriter, CamStore

H, W = 375, 500
MAX_RATIO = 0.25


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(x)[None].float()
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()


def make_cams(
    rng: np.random.Generator, active: tuple[float, float] = (0.1, 0.4), height: int = H, width: int = W
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's (keys, cam, high_res) shaped like IRN's make_cam output.

    ``active``: range of the fraction of stride-16 cells left positive per class (object size).
    """
    k = int(rng.integers(1, 4))
    keys = np.sort(rng.choice(20, size=k, replace=False))
    s16 = (math.ceil(height / 16), math.ceil(width / 16))
    planes = []
    for _ in range(k):
        coarse = rng.standard_normal((1, int(rng.integers(2, 6)), int(rng.integers(2, 6)))).astype(np.float32)
        fine = rng.standard_normal((1, *s16)).astype(np.float32)
        score = _resize(coarse, s16) + 0.25 * fine
        score = score - np.quantile(score, 1 - rng.uniform(*active))
        planes.append(np.maximum(score[0], 0))
    o = np.stack(planes)  # K x h16 x w16, ReLU'd network output
    cam = _resize(o, (math.ceil(height / 4), math.ceil(width / 4)))
    high_res = _resize(o, (s16[0] * 16, s16[1] * 16))[:, :height, :width]
    cam /= cam.max(axis=(1, 2), keepdims=True) + 1e-5
    high_res /= high_res.max(axis=(1, 2), keepdims=True) + 1e-5
    return keys, cam.astype(np.float32), high_res.astype(np.float32)


def bench_npy(images, root: Path, order) -> tuple[float, float, float]:
    root.mkdir()
    t0 = time.perf_counter()
    for image_id, (_, cam, high_res) in images.items():
        np.save(root / f"{image_id}_cam.npy", cam)
        np.save(root / f"{image_id}_high_res.npy", high_res)
    write = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in root.iterdir())
    t0 = time.perf_counter()
    for image_id in order:
        np.load(root / f"{image_id}_cam.npy")
        np.load(root / f"{image_id}_high_res.npy")
    read = time.perf_counter() - t0
    n = len(images)
    return size / n, write / n, read / n


def bench_store(images, path: Path, order, level: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    with CamShardWriter(path, config={"bench": True}, scales=[1.0], normalisation="max", gzip_level=level) as w:
        for image_id, (keys, cam, high_res) in images.items():
            w.add(image_id, keys, cam, high_res)
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    with CamStore([path]) as store:
        for image_id in order:
            store[image_id]
    read = time.perf_counter() - t0
    n = len(images)
    return path.stat().st_size / n, write / n, read / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-images", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--active",
        type=float,
        nargs=2,
        default=[0.1, 0.4],
        metavar=("LO", "HI"),
        help="range of the fraction of each class map left positive (larger = harder to compress)",
    )
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 6, 9], help="gzip levels to measure")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    images = {f"2007_{i:06d}": make_cams(rng, tuple(args.active)) for i in range(args.num_images)}
    order = list(images)
    rng.shuffle(order)
    high = np.concatenate([h.reshape(-1) for _, _, h in images.values()])
    ks = [len(k) for k, _, _ in images.values()]
    print(
        f"{args.num_images} images {H}x{W}, K = {min(ks)}..{max(ks)} (mean {np.mean(ks):.2f}); high_res pixels: "
        f"{np.mean(high == 0):.1%} exactly 0, {np.mean(high < 0.05):.1%} < 0.05, {np.mean(high > 0.5):.1%} > 0.5"
    )

    levels = sorted(set(args.levels) | {DEFAULT_GZIP_LEVEL})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        npy_bytes, npy_write, npy_read = bench_npy(images, tmp / "npy", order)
        print(f"\n{'format':<22}{'bytes/image':>12}{'ratio':>8}{'write ms/img':>14}{'read ms/img':>13}")
        print(f"{'float32 .npy':<22}{npy_bytes:>12.0f}{1:>8.3f}{npy_write * 1e3:>14.2f}{npy_read * 1e3:>13.2f}")
        ratios = {}
        for level in levels:
            size, write, read = bench_store(images, tmp / f"cams_gzip{level}.h5", order, level)
            ratios[level] = size / npy_bytes
            name = f"hdf5 fp16 gzip{level}" + (" *" if level == DEFAULT_GZIP_LEVEL else "")
            print(f"{name:<22}{size:>12.0f}{ratios[level]:>8.3f}{write * 1e3:>14.2f}{read * 1e3:>13.2f}")

    ratio = ratios[DEFAULT_GZIP_LEVEL]
    verdict = "OK" if ratio <= MAX_RATIO else "TOO LARGE"
    print(f"\n* default level {DEFAULT_GZIP_LEVEL}: store / npy = {ratio:.3f} (limit {MAX_RATIO}) -> {verdict}")
    return 0 if ratio <= MAX_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
