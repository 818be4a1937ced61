"""Summary table: gathers every stage's metrics file; the weak/full ratio; Markdown copy."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from wsss.tables import ablation_markdown, ablation_table, summary_table, to_markdown, write_summary


def _write(path, **cols):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([cols]).to_csv(path, index=False)


def fake_experiment(res, name, deeplab_miou, seed=True):
    d = res / name
    if seed:
        pd.DataFrame({"threshold": [0.1, 0.2], "miou": [0.3, 0.4], "chosen_with_gt": [False, True]}).to_csv(
            (d / "seeds").mkdir(parents=True) or d / "seeds" / "threshold_sweep.csv", index=False
        )
        _write(d / "crf" / "metrics.csv", miou=0.45)
        _write(d / "irn" / "ir_labels" / "metrics.csv", confident_pixel_accuracy=0.9, coverage=0.6, miou_confident=0.5)
        _write(d / "irn" / "masks" / "metrics.csv", miou=0.5)
    _write(d / "deeplab" / "metrics.csv", miou=deeplab_miou, JF=0.55, pseudo_masks="irn" if seed else "gt")
    (d / "benchmarks").mkdir(parents=True, exist_ok=True)
    for shard, s in (("1-of-2", 10.0), ("2-of-2", 12.5)):
        (d / "benchmarks" / f"cam_shard-{shard}.tsv").write_text(f"s\th:m:s\n{s}\t0:00:10\n")


def test_summary_rows_and_ratio(tmp_path):
    fake_experiment(tmp_path, "weak/s0", 0.6)
    fake_experiment(tmp_path, "full/s0", 0.8, seed=False)
    df = summary_table(tmp_path, ["weak/s0", "full/s0"], fully_supervised="full")
    assert list(df["seed"]) == [0, 0]
    weak = df.set_index("experiment").loc["weak"]
    assert weak["seed_miou"] == 0.4 and weak["seed_threshold"] == 0.2
    assert weak["crf_miou"] == 0.45 and weak["ir_label_precision"] == 0.9 and weak["ir_label_coverage"] == 0.6
    assert weak["irn_miou"] == 0.5 and weak["deeplab_jf"] == 0.55
    assert weak["weak_full_ratio"] == pytest.approx(0.75)
    assert weak["time_cam_shard_s"] == pytest.approx(22.5) and math.isnan(weak["time_train_irn_s"])
    full = df.set_index("experiment").loc["full"]
    assert math.isnan(full["seed_miou"]) and full["weak_full_ratio"] == 1.0
    md = to_markdown(df)
    assert "| weak | 0 | 0.20 | 40.0 |" in md and md.count("\n|") >= 3


def test_affinitynet_miou_column(tmp_path):
    """``affinitynet_miou`` from ``affinitynet/masks/metrics.csv`` (checked reader: a damaged file
    names itself); NaN for a run that did not make AffinityNet masks."""
    from wsss.io import DataError

    fake_experiment(tmp_path, "irn/s0", 0.6)
    fake_experiment(tmp_path, "aff/s0", 0.6)
    _write(tmp_path / "aff" / "s0" / "affinitynet" / "masks" / "metrics.csv", miou=0.42)
    df = summary_table(tmp_path, ["irn/s0", "aff/s0"]).set_index("experiment")
    assert df.loc["aff", "affinitynet_miou"] == 0.42 and math.isnan(df.loc["irn", "affinitynet_miou"])
    _write(tmp_path / "aff" / "s0" / "affinitynet" / "masks" / "metrics.csv", mIoU=0.42)
    with pytest.raises(DataError, match="affinitynet"):
        summary_table(tmp_path, ["aff/s0"])


def test_unknown_fully_supervised_experiment(tmp_path):
    fake_experiment(tmp_path, "weak/s0", 0.6)
    with pytest.raises(KeyError, match="not an experiment"):
        summary_table(tmp_path, ["weak/s0"], fully_supervised="nope")


def test_ablation_mean_and_std_over_seeds(tmp_path):
    for seed, m in ((0, 0.6), (1, 0.7), (2, 0.8)):
        fake_experiment(tmp_path, f"a/s{seed}", m)
    fake_experiment(tmp_path, "b/s0", 0.5)
    ab = ablation_table(summary_table(tmp_path, ["a/s0", "a/s1", "a/s2", "b/s0"])).set_index("experiment")
    assert ab.loc["a", "n_seeds"] == 3 and ab.loc["a", "deeplab_miou_mean"] == pytest.approx(0.7)
    assert ab.loc["a", "deeplab_miou_std"] == pytest.approx(0.1)  # sample std of 0.6, 0.7, 0.8
    assert ab.loc["b", "n_seeds"] == 1 and math.isnan(ab.loc["b", "deeplab_miou_std"])
    md = ablation_markdown(ab.reset_index())
    assert "70.0 ± 10.0" in md and "| b | 1 |" in md


def test_write_summary_files(tmp_path):
    fake_experiment(tmp_path, "weak/s0", 0.6)
    write_summary(
        tmp_path,
        ["weak/s0"],
        tmp_path / "t" / "summary.csv",
        tmp_path / "t" / "summary.md",
        ablation_csv=tmp_path / "t" / "ablation.csv",
        ablation_md=tmp_path / "t" / "ablation.md",
    )
    assert (tmp_path / "t" / "ablation.csv").exists() and (tmp_path / "t" / "ablation.md").exists()
    assert pd.read_csv(tmp_path / "t" / "summary.csv")["deeplab_miou"].iloc[0] == 0.6
    assert (tmp_path / "t" / "summary.md").read_text().startswith("| experiment | seed |")
