"""The Snakemake workflow itself: lint, dry-runs of the default DAG, and the tiny preset end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def job_counts(output: str) -> dict:
    """Parse the 'Job stats' table of a (dry-)run."""
    counts, table = {}, False
    for line in output.splitlines():
        if line.startswith("Job stats"):
            table = True
            continue
        if table:
            m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
            if m and m.group(1) != "total":
                counts[m.group(1)] = int(m.group(2))
            elif line.strip() == "" and counts:
                break
    return counts


@pytest.mark.parametrize("dataset", ["synthetic", "voc12", "coco14"])
def test_lint_is_clean(tmp_path, dataset):
    proc = snakemake(tmp_path, "--lint", "--config", f"dataset={{name: {dataset}}}")
    out = proc.stdout + proc.stderr
    assert "Lints for" not in out, out


def test_default_dag_dry_run(tmp_path):
    out = snakemake(tmp_path, "-n").stdout
    counts = job_counts(out)
    assert counts["synthetic_dataset"] == 1 and counts["dataset_stats"] == 1
    assert counts["train_classifier"] == 1 and counts["cam_shard"] == 2 and counts["seed_eval"] == 1
    assert counts["crf_shard"] == 2 and counts["ir_labels_shard"] == 2 and counts["train_irn"] == 1
    assert counts["irn_masks_shard"] == 2 and counts["train_deeplab"] == 1 and counts["deeplab_predict_shard"] == 2
    assert counts["summary_table"] == 1


def test_bad_config_fails_before_the_dag(tmp_path):
    proc = snakemake(tmp_path, "-n", "--config", "classifier={lr: fast}", check=False)
    assert proc.returncode != 0
    assert "config key 'classifier.lr'" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path):
    """Full tiny DAG; a second run does nothing; deleting one output reruns only what depends on it."""
    snakemake(tmp_path, "--configfile", str(TINY), "--cores", "2")
    res = tmp_path / "results" / "synthetic-tiny"
    for f in ["stats.csv", "montage.png", "labels.csv", "baseline/s0/classifier/model.pt",
              "baseline/s0/cams/shard-1-of-2.h5", "baseline/s0/cams/shard-2-of-2.h5",
              "baseline/s0/seeds/threshold_sweep.csv", "baseline/s0/seeds/gallery.png", "baseline/s0/crf/metrics.csv",
              "baseline/s0/irn/ir_labels/metrics.csv", "baseline/s0/irn/model.pt", "baseline/s0/irn/masks/metrics.csv",
              "baseline/s0/deeplab/model.pt", "baseline/s0/deeplab/metrics.csv", "baseline/s0/deeplab/gallery.png",
              "tables/summary.csv", "tables/summary.md"]:
        assert (res / f).exists(), f
    import pandas as pd

    summary = pd.read_csv(res / "tables" / "summary.csv")
    assert list(summary["experiment"]) == ["baseline"] and list(summary["run"]) == ["baseline/s0"]
    assert (res / "tables" / "ablation.csv").exists()
    for col in ["seed_miou", "crf_miou", "ir_label_precision", "irn_miou", "deeplab_miou", "time_train_classifier_s"]:
        assert 0 <= summary[col].iloc[0] and summary[col].notna().all(), col
    assert "Nothing to be done" in (p := snakemake(tmp_path, "--configfile", str(TINY), "-n")).stdout + p.stderr

    # the self-contained HTML report with tables, curves and galleries
    snakemake(tmp_path, "--configfile", str(TINY), "--report", "report.html")
    html = (tmp_path / "report.html").read_text(errors="replace")
    assert "summary.csv" in html and "pseudo_mask_gallery.png" in html and "training_curves.png" in html

    # a final output deleted: only its rule reruns
    (res / "stats.csv").unlink()
    out = snakemake(tmp_path, "--configfile", str(TINY), "-n").stdout
    assert job_counts(out) == {"dataset_stats": 1, "all": 1}, out

    # an intermediate output deleted and asked for: only that job reruns, and since inference is
    # deterministic it writes the same bytes, so nothing downstream is out of date
    shard = res / "baseline" / "s0" / "cams" / "shard-2-of-2.h5"
    before = shard.read_bytes()
    shard.unlink()
    target = str(shard.relative_to(tmp_path))
    out = snakemake(tmp_path, "--configfile", str(TINY), "-n", target).stdout
    assert job_counts(out) == {"cam_shard": 1}, out
    snakemake(tmp_path, "--configfile", str(TINY), "--cores", "2", target)
    assert shard.read_bytes() == before
    out = snakemake(tmp_path, "--configfile", str(TINY), "-n").stdout
    assert job_counts(out) == {"dataset_stats": 1, "all": 1}, out

    # forcing one stage reruns it and exactly what depends on it
    out = snakemake(tmp_path, "--configfile", str(TINY), "-n", "-R", "cam_shard").stdout
    counts = job_counts(out)
    assert counts["cam_shard"] == 2, out
    assert {"cam_shard", "seed_eval", "crf_shard", "ir_labels_shard", "irn_masks_shard", "train_deeplab",
            "summary_table", "dataset_stats"} <= set(counts), out
    assert "train_classifier" not in counts and "synthetic_dataset" not in counts, out


def test_ablation_preset_dry_run(tmp_path):
    """configs/ablations.yaml (KTSE Table 6, AEFT Table 2, HFPL Table 4 rows x 3 seeds) builds its DAG."""
    out = snakemake(tmp_path, "--configfile", str(REPO / "config.yaml"), str(REPO / "configs" / "ablations.yaml"), "-n").stdout
    counts = job_counts(out)
    assert counts["train_classifier"] == (16 + 1) * 3 and counts["summary_table"] == 1, out  # + config.yaml's baseline


@pytest.mark.slow
def test_ablation_on_tiny_dataset(tmp_path):
    """Two experiments x two seeds on the tiny preset give the ablation table (mean ± std)."""
    import pandas as pd

    snakemake(tmp_path, "--configfile", str(TINY), str(REPO / "tests" / "configs" / "ablation_tiny.yaml"), "--cores", "2")
    ab = pd.read_csv(tmp_path / "results" / "synthetic-tiny" / "tables" / "ablation.csv").set_index("experiment")
    assert sorted(ab.index) == ["baseline", "isl"] and (ab["n_seeds"] == 2).all()
    assert ab["seed_miou_std"].notna().all() and ab["deeplab_miou_mean"].notna().all()
    assert "±" in (tmp_path / "results" / "synthetic-tiny" / "tables" / "ablation.md").read_text()
