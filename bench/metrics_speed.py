"""Time of one confusion-matrix and one boundary (J&F) update at VOC size (375x500, 21 classes).

python bench/metrics_speed.py
"""

from __future__ import annotations

import time

import numpy as np

from wsss.metrics import BoundaryAccumulator, ConfusionMatrix


def median_ms(fn, repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    rng = np.random.default_rng(0)
    gt = np.zeros((375, 500), np.uint8)
    gt[100:300, 150:400] = 12
    gt[rng.random(gt.shape) < 0.03] = 255
    pred = np.roll(gt, 3, axis=1)
    pred[pred == 255] = 0
    cm, ba = ConfusionMatrix(21), BoundaryAccumulator(21)
    print(f"confusion-matrix update: {median_ms(lambda: cm.update(gt, pred)):.2f} ms / image")
    print(f"boundary (J&F) update:   {median_ms(lambda: ba.update(gt, pred)):.2f} ms / image")


if __name__ == "__main__":
    main()
