"""Wall time of one ACR training step (RU + CU phases) on the CPU, per reconstructor width.

    python bench/acr_step.py [--threads 2] [--batch 16] [--crop 128] [--repeat 2]

Builds ACR on a random-init ResNet-18 for 8 classes, as the synthetic default trains it, and
times ``train_step`` on a random batch (median of ``--repeat`` steps after one warm-up step) for
the official reconstructor (U-Net level-1 width 64, encoder reducers 64/128/256) and the narrowed
one of ``configs/methods.yaml`` (16 and 16/32/64); the U-Net depth is the largest that divides the
crop. It also prints what the 12 synthetic epochs (25 steps each) would take. Figures go into the
README ("Methods on the synthetic default") and docs/methods/acr.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch

from wsss.methods import build_method
from wsss.methods.base import StepContext
from wsss.models import build_backbone

VARIANTS = {"official": (64, [64, 128, 256]), "narrowed (configs/methods.yaml)": (16, [16, 32, 64])}
STEPS_12_EPOCHS = 12 * 25  # 400 train_aug images, batch 16


def step_seconds(width: int, dims: list, args) -> float:
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", pretrained="none", freeze_bn=False, trainable_from="stage3")
    depth = min(8, int(math.log2(args.crop & -args.crop)))
    method = build_method("acr", num_classes=8, backbone=backbone, unet_depth=depth, unet_width=width, recon_dims=dims)
    optimizer = torch.optim.SGD([{"params": g["params"]} for g in method.param_groups()], lr=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    labels = torch.zeros(args.batch, 8)
    labels[:, 0] = 1
    labels[::2, 3] = 1
    batch = {"image": torch.randn(args.batch, 3, args.crop, args.crop), "label": labels}
    method.train()
    times = []
    for step in range(args.repeat + 1):
        ctx = StepContext(step=step, max_step=STEPS_12_EPOCHS, epoch=0, max_epoch=12, device=torch.device("cpu"))
        t0 = time.perf_counter()
        method.train_step(batch, ctx, optimizer, scaler)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"ACR train_step, ResNet-18, batch {args.batch}, crop {args.crop}, {args.threads} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    for name, (width, dims) in VARIANTS.items():
        s = step_seconds(width, dims, args)
        print(
            f"{name:32s} width {width:3d}, reducers {dims}: {s:6.2f} s/step, "
            f"12 synthetic epochs ~{s * STEPS_12_EPOCHS / 60:5.1f} min"
        )


if __name__ == "__main__":
    main()
