"""One-command GPU check (``bash bench/gpu_check.sh``): the figures to record in the README.

Checks, on the first CUDA device (DDP: on all visible ones):

1. **AMP training steps** of the classifier (``cam`` method), IRN and DeepLab-v2, through the
   engine's own step (``wsss.engine.train_step``: autocast + GradScaler, as in training): from the
   same initial weights and the same batches, ``--steps`` steps in fp32 and in AMP; every loss
   must be finite and each step's AMP loss within ``--tol`` (relative) of the fp32 loss. Steps the
   GradScaler skipped (inf/NaN gradients at its first scale) are reported; the comparison then
   covers the steps before the first skip. Also the time per step of each precision.
2. **CAM inference images/s**: ``bench/cam_throughput.py`` in fp32, bf16 and fp16, channels_last.
3. **DDP DeepLab** on all visible GPUs: ``wsss.engine.train`` under ``torchrun`` (one process per
   GPU, NCCL) on random tensors; checks that every rank ends with the same weights and prints
   images/s (with 1 GPU as well when there are more).

Without CUDA it runs in **skip mode**: it prints what it would check, "no CUDA device: skipped"
for each GPU check, runs the AMP-vs-fp32 comparison on the CPU (bf16 autocast, tiny inputs, a few
steps) and exits 0.

    bash bench/gpu_check.sh                      # everything the machine allows
    bash bench/gpu_check.sh --steps 5 --tol 0.05
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

GPU_CHECKS = (
    "AMP training steps (classifier, IRN, DeepLab) vs fp32",
    "CAM inference images/s (bench/cam_throughput.py: fp32, bf16, fp16)",
    "DDP DeepLab on all visible GPUs (torchrun, NCCL)",
)
#: (backbone / network size, batch, crop) of the AMP check: CPU (tiny) and GPU (the VOC recipes)
SIZES = {
    "cpu": {"classifier": ("resnet18", 2, 64), "irn": ("resnet18", 2, 64), "deeplab": ("resnet18_os8", 2, 64)},
    "cuda": {"classifier": ("resnet50", 16, 512), "irn": ("resnet50", 32, 512), "deeplab": ("resnet101_os8", 16, 321)},
}


# ----------------------------------------------------------------------------------------------
# networks and batches of one training step


def build_classifier(backbone: str):
    from wsss.methods import build_method
    from wsss.models.backbones import build_backbone

    bb = build_backbone(backbone, pretrained="none", freeze_bn=False, trainable_from=None)
    return build_method("cam", num_classes=20, backbone=bb)


def build_irn(backbone: str):
    from wsss.refine.irn import IRNMethod

    return IRNMethod(backbone, pretrained="none", radius=5)


def build_deeplab(backbone: str):
    from wsss.seg.models import build_seg_model
    from wsss.seg.train import SegmentationMethod

    return SegmentationMethod(build_seg_model("deeplabv2", 21, backbone=backbone, pretrained="none"))


def make_batches(kind: str, n: int, batch: int, crop: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """``n`` random batches of ``kind`` (classifier: multi-hot labels; irn: IR labels at stride 4
    with ignored pixels; deeplab: masks)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {"image": torch.randn(batch, 3, crop, crop, generator=g)}
        if kind == "classifier":
            b["label"] = (torch.rand(batch, 20, generator=g) < 0.15).float()
            b["label"][:, 0] = 1.0
        elif kind == "irn":
            lab = torch.randint(0, 3, (batch, crop // 4, crop // 4), generator=g)
            lab[:, : crop // 32 + 1] = 255
            b["label"] = lab
        else:
            b["mask"] = torch.randint(0, 21, (batch, crop, crop), generator=g)
        out.append(b)
    return out


BUILDERS: Dict[str, Callable] = {"classifier": build_classifier, "irn": build_irn, "deeplab": build_deeplab}


# ----------------------------------------------------------------------------------------------
# AMP vs fp32


def run_steps(method, batches, device: torch.device, use_amp: bool, lr: float = 0.01) -> Dict[str, Any]:
    """Losses (and the GradScaler's skipped steps, seconds per step) of the engine's training step
    over ``batches``; autocast is the engine's (fp16 + GradScaler on CUDA, bf16 on the CPU)."""
    from wsss.engine import TrainConfig, build_optimizer, train_step
    from wsss.methods.base import StepContext

    method = method.to(device).train()
    opt = build_optimizer(method.param_groups(), TrainConfig(lr=lr, momentum_mode="standard", momentum=0.9))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")
    losses, skipped, times = [], [], []
    for i, b in enumerate(batches):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        ctx = StepContext(step=i, max_step=len(batches), epoch=0, max_epoch=1, device=device)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            terms = train_step(method, b, ctx, opt, scaler, use_amp)
            loss = terms["loss_total"]
        except FloatingPointError:
            loss = float("nan")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        skipped.append(scaler.is_enabled() and scaler.get_scale() < scale)
    return {"losses": losses, "skipped": skipped, "seconds": times}


def amp_vs_fp32(
    build: Callable[[], torch.nn.Module],
    batches: List[Dict[str, torch.Tensor]],
    device: torch.device,
    tol: float = 0.05,
    lr: float = 0.01,
) -> Dict[str, Any]:
    """Train a copy of one initial network in fp32 and one in AMP on the same ``batches``; ``ok``
    when every loss is finite and each compared step's AMP loss is within ``tol`` (relative) of fp32.
    Compared: the steps before the GradScaler's first skipped step (a skip leaves the weights
    unchanged, so later steps differ by design)."""
    torch.manual_seed(0)
    net = build()
    fp32 = run_steps(copy.deepcopy(net), batches, device, use_amp=False, lr=lr)
    amp = run_steps(copy.deepcopy(net), batches, device, use_amp=True, lr=lr)
    n = next((i for i, s in enumerate(amp["skipped"]) if s), len(batches))
    n = max(n, 1)
    rel = [abs(a - f) / max(abs(f), 1e-12) for a, f in zip(amp["losses"][:n], fp32["losses"][:n])]
    finite = all(math.isfinite(v) for v in fp32["losses"] + amp["losses"][:n])
    max_rel = max(rel) if rel else float("nan")
    return {
        "fp32_losses": fp32["losses"],
        "amp_losses": amp["losses"],
        "compared_steps": n,
        "skipped_steps": sum(amp["skipped"]),
        "max_rel_diff": max_rel,
        "finite": finite,
        "ok": finite and max_rel <= tol,
        "tol": tol,
        # the first step includes cuDNN autotuning / allocation: leave it out when there are more
        "fp32_s_per_step": _steady(fp32["seconds"]),
        "amp_s_per_step": _steady(amp["seconds"]),
        "amp_dtype": "fp16 + GradScaler" if device.type == "cuda" else "bf16",
    }


def _steady(times: List[float]) -> float:
    rest = times[1:] if len(times) > 1 else times
    return sum(rest) / len(rest)


def amp_checks(device: torch.device, steps: int, tol: float, sizes: Dict[str, tuple]) -> bool:
    ok = True
    for kind, (backbone, batch, crop) in sizes.items():
        batches = make_batches(kind, steps, batch, crop)
        r = amp_vs_fp32(lambda: BUILDERS[kind](backbone), batches, device, tol=tol)
        ok &= r["ok"]
        print(
            f"  {kind:<10} {backbone:<14} batch {batch:>2} crop {crop:>3}: "
            f"fp32 loss {r['fp32_losses'][-1]:.4f}, {r['amp_dtype']} loss {r['amp_losses'][-1]:.4f}; "
            f"max rel diff {r['max_rel_diff']:.2e} over {r['compared_steps']} steps (tol {tol:g}), "
            f"skipped {r['skipped_steps']}; s/step fp32 {r['fp32_s_per_step']:.3f}, amp {r['amp_s_per_step']:.3f}"
            f" -> {'OK' if r['ok'] else 'FAIL'}",
            flush=True,
        )
    return ok


# ----------------------------------------------------------------------------------------------
# CAM throughput and DDP (CUDA only)


def cam_throughput(images: int) -> bool:
    ok = True
    for precision in ("fp32", "bf16", "fp16"):
        cmd = [
            sys.executable,
            str(REPO / "bench" / "cam_throughput.py"),
            "--images",
            str(images),
            "--precision",
            precision,
            "--channels-last",
            "--threads",
            str(min(8, os.cpu_count() or 1)),
        ]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        print(f"  precision {precision}:")
        print("\n".join("    " + line for line in (p.stdout + p.stderr).strip().splitlines()[-6:]), flush=True)
        ok &= p.returncode == 0
    return ok


def ddp_worker(out_dir: str, images: int, batch: int, crop: int, backbone: str) -> int:
    """Under torchrun: DeepLab-v2 trained one epoch by ``wsss.engine.train`` (DDP), rank results to JSON."""
    from wsss.engine import TrainConfig, train

    class Tensors(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(images, 3, crop, crop, generator=g)
            self.y = torch.randint(0, 21, (images, crop, crop), generator=g)

        def __len__(self):
            return images

        def __getitem__(self, i):
            return {"image": self.x[i], "mask": self.y[i], "index": i}

    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    method = build_deeplab(backbone)
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, momentum_mode="standard", amp=True, seed=0)
    out = Path(out_dir)
    t0 = time.perf_counter()
    train(
        method,
        Tensors(),
        cfg,
        out / "model.pt",
        out / "work",
        resolved_config={"ddp_check": [images, batch, crop, backbone]},
        progress=False,
        distributed=True,
    )
    seconds = time.perf_counter() - t0
    flat = torch.cat([p.detach().float().flatten().cpu() for p in method.parameters()])
    (out / f"rank{rank}.json").write_text(
        json.dumps({"seconds": seconds, "checksum": float(flat.double().sum()), "norm": float(flat.norm())})
    )
    return 0


def ddp_check(gpus: int, images: int, batch: int, crop: int, backbone: str) -> bool:
    ok = True
    for n in sorted({1, gpus}):
        with tempfile.TemporaryDirectory(prefix="wsss-ddp-") as d:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={n}",
                str(Path(__file__).resolve()),
                "ddp-worker",
                d,
                str(images),
                str(batch),
                str(crop),
                backbone,
            ]
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            ranks = [json.loads(f.read_text()) for f in sorted(Path(d).glob("rank*.json"))]
            if p.returncode != 0 or len(ranks) != n:
                print(f"  {n} GPU(s): FAIL (exit {p.returncode})\n{(p.stdout + p.stderr)[-2000:]}", flush=True)
                ok = False
                continue
            same = all(math.isclose(r["checksum"], ranks[0]["checksum"], rel_tol=1e-6) for r in ranks)
            sec = max(r["seconds"] for r in ranks)
            print(
                f"  {n} GPU(s): {backbone} batch {batch} crop {crop}, {images} images, 1 epoch AMP in {sec:.1f} s "
                f"({images / sec:.1f} images/s, start-up included); ranks in sync: {same} -> {'OK' if same else 'FAIL'}",
                flush=True,
            )
            ok &= same
    return ok


# ----------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ddp-worker"]:
        d, images, batch, crop, backbone = argv[1:6]
        return ddp_worker(d, int(images), int(batch), int(crop), backbone)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="training steps of the AMP comparison")
    ap.add_argument("--tol", type=float, default=0.05, help="relative AMP-vs-fp32 loss tolerance per step")
    ap.add_argument("--cam-images", type=int, default=50)
    ap.add_argument("--ddp-images", type=int, default=256)
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU bf16 AMP comparison")
    a = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}; CUDA devices: {torch.cuda.device_count() if cuda else 0}")
    print("GPU checks:")
    for i, c in enumerate(GPU_CHECKS, 1):
        print(f"  {i}. {c}")
    ok = True
    if not a.no_cpu:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        print(f"CPU: AMP (bf16 autocast) vs fp32, {a.steps} steps, tiny inputs:", flush=True)
        ok &= amp_checks(torch.device("cpu"), a.steps, a.tol, SIZES["cpu"])
    if not cuda:
        for i, c in enumerate(GPU_CHECKS, 1):
            print(f"{i}. {c}: no CUDA device: skipped")
        print("CPU checks " + ("passed" if ok else "FAILED"))
        return 0 if ok else 1
    dev = torch.device("cuda", 0)
    name, gpus = torch.cuda.get_device_name(0), torch.cuda.device_count()
    print(f"device: {name} x {gpus}", flush=True)
    print(f"1. {GPU_CHECKS[0]}:", flush=True)
    ok &= amp_checks(dev, a.steps, a.tol, SIZES["cuda"])
    print(f"2. {GPU_CHECKS[1]}:", flush=True)
    ok &= cam_throughput(a.cam_images)
    print(f"3. {GPU_CHECKS[2]}:", flush=True)
    ok &= ddp_check(gpus, a.ddp_images, 16 if 16 % gpus == 0 else gpus * 2, 321, "resnet101_os8")
    print(f"GPU check on {name}: " + ("all passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
