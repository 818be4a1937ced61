"""bench/cost_model.py on a hand-made figures JSON: fitted costs, hours, walls and shards by hand."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cost_model", REPO / "bench" / "cost_model.py")
cm = importlib.util.module_from_spec(_spec)
sys.modules["cost_model"] = cm
_spec.loader.exec_module(cm)


def _stage(unit, units, job_s):
    return {
        "unit": unit,
        "seconds_per_unit": round(job_s / units, 4),
        "job_seconds": job_s,
        "units": units,
        "peak_mib": 100,
    }


#: job seconds at 8 + 4 (small) and 16 + 8 (large) images, chosen so the fits are round numbers
FIGURES = {
    "machine": "test 2 CPUs",
    "device": "cpu",
    "rehearsals": [
        {
            "images": 8,
            "val_images": 4,
            "stages": {
                "train_classifier": _stage("image-epoch", 8, 10.0),  # 1 s / image-epoch + 2 s
                "cam_shard": _stage("image", 12, 24.0),  # 2 s / image
                "crf_shard": _stage("image", 12, 6.0),  # 0.5 s / image
                "ir_labels_shard": _stage("image", 12, 12.0),  # 1 s / image
                "irn_masks_shard": _stage("image", 12, 14.0),  # 1 s / image + 2 s
                "deeplab_predict_shard": _stage("image", 4, 20.0),  # cheaper when larger: no fit
            },
        },
        {
            "images": 16,
            "val_images": 8,
            "stages": {
                "train_classifier": _stage("image-epoch", 16, 18.0),
                "cam_shard": _stage("image", 24, 48.0),
                "crf_shard": _stage("image", 24, 12.0),
                "ir_labels_shard": _stage("image", 24, 24.0),
                "irn_masks_shard": _stage("image", 24, 26.0),
                "deeplab_predict_shard": _stage("image", 8, 16.0),
            },
        },
    ],
}
CFG = {"classifier": {"epochs": 2}, "irn": {"train": {"epochs": 3}}, "deeplab": {"epochs": 5}}


def test_rules_with_a_gpu_are_read_from_the_smk_files():
    info = cm.rule_info()
    assert {r for r, i in info.items() if i.gpu} == {
        "pretrain",
        "irn_gallery",
        "train_classifier",
        "cam_shard",
        "train_irn",
        "irn_masks_shard",
        "train_affinitynet",
        "affinitynet_masks_shard",
        "train_deeplab",
        "deeplab_predict_shard",
    }
    assert info["crf_shard"].threads == 2 and not info["crf_shard"].gpu
    assert set(cm.STAGES) <= set(info)


def test_fit_gives_marginal_cost_and_overhead():
    c = cm.fit_costs(FIGURES)
    assert c["train_classifier"].seconds_per_unit == pytest.approx(1.0)
    assert c["train_classifier"].overhead_s == pytest.approx(2.0)
    assert c["cam_shard"].seconds_per_unit == pytest.approx(2.0) and c["cam_shard"].overhead_s == pytest.approx(0)
    # a negative slope: the larger rehearsal's seconds per unit, no overhead
    assert c["deeplab_predict_shard"].seconds_per_unit == pytest.approx(2.0)
    assert c["deeplab_predict_shard"].overhead_s == 0
    assert cm.rehearsal_cores(FIGURES) == 2


def test_projection_by_hand():
    res = cm.project(
        cm.fit_costs(FIGURES), CFG, 100, 20, gpus=2, cpu_jobs=8, rules=cm.rule_info(), gpu_speedup=4, cores=2
    )
    rows = {r.rule: r for r in res["rows"]}
    assert list(rows) == [
        "train_classifier",
        "cam_shard",
        "crf_shard",
        "ir_labels_shard",
        "irn_masks_shard",
        "deeplab_predict_shard",
    ]
    # classifier: 100 x 2 epochs at 1/4 s + 2 s overhead = 52 s on one GPU
    r = rows["train_classifier"]
    assert (r.device, r.units, r.shards) == ("GPU", 200, 1)
    assert r.hours * 3600 == pytest.approx(52) and r.wall_h * 3600 == pytest.approx(52)
    # CAMs: 120 images x 0.5 s = 60 GPU-s; 2 shards on 2 GPUs: 30 s (4 shards tie, fewer wins)
    r = rows["cam_shard"]
    assert (r.units, r.shards) == (120, 2)
    assert r.hours * 3600 == pytest.approx(60) and r.wall_h * 3600 == pytest.approx(30)
    # CRF on CPU: 60 job-s x 2 threads = 120 core-s; 8 shards on 8 slots: 7.5 s
    r = rows["crf_shard"]
    assert (r.device, r.shards) == ("CPU", 8)
    assert r.hours * 3600 == pytest.approx(120) and r.wall_h * 3600 == pytest.approx(7.5)
    # irn.shards splits the CPU IR labels (1 s / image) and the GPU masks (0.25 s / image + 2 s a
    # job): 8 shards = 15 s + 4 waves x (2 + 30 / 8) s = 38 s, less than 6 (41), 7 (42.3), 16 (46)
    assert res["shards"]["irn"] == 8
    assert rows["ir_labels_shard"].wall_h * 3600 == pytest.approx(15)
    assert rows["ir_labels_shard"].hours * 3600 == pytest.approx(240)
    assert rows["irn_masks_shard"].wall_h * 3600 == pytest.approx(23)
    assert rows["irn_masks_shard"].hours * 3600 == pytest.approx(8 * 2 + 30)
    # DeepLab prediction: the 20 val images x 0.5 s, 2 shards: 5 s
    assert rows["deeplab_predict_shard"].units == 20
    assert rows["deeplab_predict_shard"].wall_h * 3600 == pytest.approx(5)
    assert res["gpu_h"] * 3600 == pytest.approx(52 + 60 + 46 + 10)
    assert res["core_h"] == pytest.approx(360 / 3600)
    assert res["wall_h"] * 3600 == pytest.approx(52 + 30 + 7.5 + 15 + 23 + 5)
    assert res["shards"] == {"cam": 2, "crf": 8, "deeplab": 2, "irn": 8}
    assert res["assumed_speedup"]


def test_measured_gpu_figures_replace_the_assumed_speedup():
    gpu = cm.fit_costs({"device": "test GPU", "stages": {"cam_shard": {"unit": "image", "seconds_per_unit": 0.1}}})
    res = cm.project(cm.fit_costs(FIGURES), CFG, 100, 20, 2, 8, cm.rule_info(), gpu, gpu_speedup=4, cores=2)
    r = next(r for r in res["rows"] if r.rule == "cam_shard")
    assert r.source == "GPU measured" and r.hours * 3600 == pytest.approx(12)
    assert math.isclose(next(r for r in res["rows"] if r.rule == "crf_shard").hours * 3600, 120)


def test_cli_markdown_on_the_fixture(tmp_path, capsys):
    f = tmp_path / "figures.json"
    f.write_text(json.dumps(FIGURES))
    assert cm.main(["--figures", str(f), "--gpus", "4", "--cpu-jobs", "64", "--markdown", "--gpu-speedup", "4"]) == 0
    out = capsys.readouterr().out
    assert "| stage | device | unit |" in out and "| **total** |" in out
    assert "10,582 + 1,449" in out and "82,081 + 40,137" in out
    assert "ASSUMPTION: GPU stages without GPU figures run 4x faster" in out
    # the default config's epochs: classifier 12 x 10,582 image-epochs
    assert "| train_classifier | GPU | image-epoch | 126,984 |" in out
