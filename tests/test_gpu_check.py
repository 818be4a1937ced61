"""bench/gpu_check.sh in skip mode on a machine without CUDA, and its AMP-vs-fp32 comparison on the CPU (bf16)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc
_spec.loader.exec_module(gc)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the full check (minutes)")
def test_skip_mode_without_cuda():
    p = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--steps", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for i, check in enumerate(gc.GPU_CHECKS, 1):
        assert f"  {i}. {check}" in out  # what it would check
        assert f"{i}. {check}: no CUDA device: skipped" in out
    # the CPU part ran: the three networks' bf16 steps within tolerance
    for kind in ("classifier", "irn", "deeplab"):
        assert any(line.strip().startswith(kind) and line.endswith("-> OK") for line in out.splitlines()), out
    assert "CPU checks passed" in out


def test_amp_vs_fp32_on_cpu_bf16():
    batches = gc.make_batches("classifier", 3, 2, 32)
    r = gc.amp_vs_fp32(lambda: gc.build_classifier("resnet18"), batches, torch.device("cpu"), tol=0.02)
    assert r["amp_dtype"] == "bf16" and r["finite"] and r["ok"]
    assert r["compared_steps"] == 3 and r["skipped_steps"] == 0
    assert len(r["fp32_losses"]) == len(r["amp_losses"]) == 3
    assert 0 < r["max_rel_diff"] < 0.02  # bf16 differs from fp32 (tolerance 0 would fail), but little


class _Diverging(torch.nn.Module):
    """A 'method' whose loss is infinite."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def param_groups(self):
        return [{"name": "w", "params": [self.w]}]

    def losses(self, batch, ctx):
        return {"x": self.w * batch["image"].mean() * float("inf")}


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_non_finite_loss_fails_the_comparison():
    batches = [{"image": torch.ones(1, 3, 4, 4)}] * 2
    r = gc.amp_vs_fp32(_Diverging, batches, torch.device("cpu"))
    assert not r["finite"] and not r["ok"]
