"""The refinement stages do what the literature reports they do: on CAM-like seeds the CRF and
IRN's random walk both raise the mIoU over the seeds (AEFT/PSA: seeds < +CRF; IRN: seeds < IRN
masks). The tiny preset's classifier trains for two epochs on 24 images (CI time), far too weak for
its CAMs to say anything about a refinement stage, so the controlled CAMs and images of
``bench/refinement_order.py`` (which prints the figures) stand in. A regression that makes either
stage worse than its input fails here.

IRN is checked on the images whose objects each cover at least 256 pixels: on smaller objects the
walk floods the image even with perfect boundaries (an object of a few stride-4 cells is all
boundary, its CAM is suppressed by ``1 - boundary``, and the spill walked through the background
becomes the global maximum), a limitation of IRN's inference (docs/irn.md, "Small objects").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "refinement_order", Path(__file__).resolve().parents[1] / "bench" / "refinement_order.py"
)
ro = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ro)


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    return ro.controlled_set(tmp_path_factory.mktemp("order") / "synthetic", 40)


def test_the_crf_improves_on_the_seeds(val_set):
    ds, cfg, items = val_set
    t, seeds = ro.best_seeds(ds, items)
    crf = ro.crf_miou(ds, cfg, items, t)  # the workflow's default: from_seeds
    assert seeds > 0.3, seeds  # the controlled CAMs make sensible seeds (measured 0.51)
    assert crf > seeds + 0.05, (seeds, crf)  # measured 0.66


def test_irn_walk_improves_on_the_seeds(val_set):
    ds, cfg, items = val_set
    items = ro.large_objects_only(items)
    assert len(items) >= 10, len(items)
    _, seeds = ro.best_seeds(ds, items)
    irn = ro.irn_walk_miou(ds, cfg, items)
    assert irn > seeds + 0.05, (seeds, irn)  # measured 0.51 -> 0.60
