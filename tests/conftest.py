"""Shared fixtures: a tiny synthetic dataset in the VOC layout, generated once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two xdist workers on a 2-core machine: one intra-op thread each, not two each (oversubscribed
    # OpenMP threads spin and slow both down); jobs that snakemake starts set their own threads
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from wsss.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic-tiny"
    generate_synthetic(root, preset="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_cfg(tiny_root):
    """A validated config pointing at the tiny dataset, with small classifier settings."""
    import yaml

    from wsss.config import deep_merge, validate_config

    # as the Snakefile reads it: config.yaml, then the tiny file on top
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    raw = deep_merge(base, yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text()))
    raw["dataset"]["root"] = str(tiny_root)
    return validate_config(raw)


@pytest.fixture(scope="module")
def single_thread():
    """One torch intra-op thread for a module of tiny-tensor tests (``pytestmark =
    pytest.mark.usefixtures("single_thread")``): faster than two, and far faster on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
