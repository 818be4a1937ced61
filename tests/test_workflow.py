"""The Snakemake workflow itself: lint, dry-runs of the default DAG, and the tiny preset end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
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
    # baseline and the fully supervised reference (upper_bound: DeepLab on ground truth, no classifier)
    assert counts["irn_masks_shard"] == 2 and counts["train_deeplab"] == 2 and counts["deeplab_predict_shard"] == 4
    assert counts["summary_table"] == 1
    # the ground-truth DeepLab has no pseudo-mask input: it waits for the dataset itself
    job = next(b for b in out.split("\n\n") if "output: results/synthetic/upper_bound/s0/deeplab/model.pt" in b)
    assert "data/synthetic/.complete" in job, job


def test_procedural_pretraining_is_one_job_before_its_users(tmp_path):
    """pretrained: procedural makes results/pretrain/<network>/model.pt once, an input of every job
    that loads it (the classifier's resnet18 and DeepLab's resnet18_os8 share one file)."""
    out = snakemake(
        tmp_path, "-n", "--config", "classifier={pretrained: procedural}", "deeplab={pretrained: procedural}"
    ).stdout
    counts = job_counts(out)
    assert counts["pretrain"] == 1 and counts["train_classifier"] == 1 and counts["train_deeplab"] == 2, out
    assert "results/pretrain/resnet18/model.pt" in out
    plain = job_counts(snakemake(tmp_path, "-n").stdout)
    assert "pretrain" not in plain


def test_bad_config_fails_before_the_dag(tmp_path):
    proc = snakemake(tmp_path, "-n", "--config", "classifier={lr: fast}", check=False)
    assert proc.returncode != 0
    assert "config key 'classifier.lr'" in proc.stdout + proc.stderr


RUN = "results/synthetic-tiny/baseline/s0"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny preset's whole DAG, run once for this module. The tests below run in file order on
    it (pytest-xdist's loadfile keeps a module on one worker): the end-to-end checks first, then the
    faults, which restore the files they damage but leave later stages out of date."""
    work = tmp_path_factory.mktemp("tiny")
    snakemake(work, "--configfile", str(TINY), "--cores", "2")
    return work


@pytest.mark.slow
def test_tiny_preset_end_to_end(tiny_run):
    """Full tiny DAG; a second run does nothing; deleting one output reruns only what depends on it."""
    tmp_path = tiny_run
    res = tmp_path / "results" / "synthetic-tiny"
    for f in [
        "stats.csv",
        "montage.png",
        "labels.csv",
        "baseline/s0/classifier/model.pt",
        "baseline/s0/cams/shard-1-of-2.h5",
        "baseline/s0/cams/shard-2-of-2.h5",
        "baseline/s0/seeds/threshold_sweep.csv",
        "baseline/s0/seeds/gallery.png",
        "baseline/s0/crf/metrics.csv",
        "baseline/s0/irn/ir_labels/metrics.csv",
        "baseline/s0/irn/model.pt",
        "baseline/s0/irn/masks/metrics.csv",
        "baseline/s0/deeplab/model.pt",
        "baseline/s0/deeplab/metrics.csv",
        "baseline/s0/deeplab/gallery.png",
        "tables/summary.csv",
        "tables/summary.md",
    ]:
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
    assert {
        "cam_shard",
        "seed_eval",
        "crf_shard",
        "ir_labels_shard",
        "irn_masks_shard",
        "train_deeplab",
        "summary_table",
        "dataset_stats",
    } <= set(counts), out
    assert "train_classifier" not in counts and "synthetic_dataset" not in counts, out
    snakemake(tmp_path, "--configfile", str(TINY), "--cores", "2")  # the deleted stats.csv: the run is whole again


@pytest.mark.slow
def test_affinitynet_masks_on_the_tiny_run(tiny_run, tmp_path):
    """``deeplab.pseudo_masks: affinitynet`` on the finished tiny run: the AffinityNet jobs (labels,
    training, masks, evaluation) reuse its classifier and CAMs and give masks with an mIoU in
    [0, 1]; the run stays complete and current for the tiny config."""
    import pandas as pd

    extra = tmp_path / "affinitynet.yaml"
    extra.write_text("deeplab: {pseudo_masks: affinitynet}\n")
    target = f"{RUN}/affinitynet/masks/metrics.csv"
    out = snakemake(tiny_run, "--configfile", str(TINY), str(extra), "-n", target).stdout
    assert job_counts(out) == {
        "affinity_labels_shard": 2,
        "train_affinitynet": 1,
        "affinitynet_masks_shard": 2,
        "eval_masks": 1,
    }, out
    snakemake(tiny_run, "--configfile", str(TINY), str(extra), "--cores", "2", "--show-failed-logs", target)
    metrics = pd.read_csv(tiny_run / target)
    assert metrics["kind"].iloc[0] == "affinitynet" and 0 <= metrics["miou"].iloc[0] <= 1, metrics
    assert (tiny_run / RUN / "affinitynet" / "model.pt").exists()
    assert not list((tiny_run / RUN / "affinitynet").glob("**/*.journal")), "finished jobs leave no journal"
    assert "Nothing to be done" in (p := snakemake(tiny_run, "--configfile", str(TINY), "-n")).stdout + p.stderr


@pytest.mark.slow
def test_ablation_over_seeds_on_the_tiny_run(tiny_run):
    """A second seed of the finished tiny run: exactly the new seed's jobs are scheduled (seed 0 is
    reused) and the summary tables are rebuilt over both. (The mean ± std table itself:
    tests/test_tables.py, which also covers rows of several experiments.)"""
    extra = ["--configfile", str(TINY), str(REPO / "tests" / "configs" / "ablation_tiny.yaml")]
    counts = job_counts(snakemake(tiny_run, *extra, "-n").stdout)
    one_run = {"train_classifier": 1, "cam_shard": 2, "train_irn": 1, "train_deeplab": 1, "summary_table": 1}
    assert {k: counts.get(k) for k in one_run} == one_run, counts
    assert "synthetic_dataset" not in counts and "dataset_stats" not in counts, counts


# faults a user causes on a finished run: none may give a silently wrong result


@pytest.mark.slow
def test_forced_rerun_after_a_model_change_rewrites_predictions(tiny_run):
    """``snakemake -R deeplab_predict_shard`` after the model changed: every prediction PNG and the
    metrics are the new model's (they used to be the old PNGs, skipped as 'already there')."""
    import pandas as pd
    import torch

    from wsss.io import read_label_png
    from wsss.workflow.markers import read_shard_markers

    run = tiny_run / RUN
    markers = sorted((run / "deeplab" / "predictions").glob("shard-*.json"))
    pred_dir, ids = read_shard_markers(markers)
    pred_dir = tiny_run / pred_dir if not pred_dir.is_absolute() else pred_dir
    before = {i: read_label_png(pred_dir / f"{i}.png") for i in ids}
    metrics_before = pd.read_csv(run / "deeplab" / "metrics.csv")
    assert not list(run.glob("**/*.journal")), "finished jobs leave no journal"

    # a different model in place (as after retraining): every pixel goes to class 2
    model = run / "deeplab" / "model.pt"
    state = torch.load(model, map_location="cpu", weights_only=True)
    num_classes = len(
        pd.read_csv(tiny_run / "results" / "synthetic-tiny" / "labels.csv", nrows=1).columns
    )  # image_id + fg
    biases = [k for k, v in state["model"].items() if k.endswith("bias") and v.ndim == 1 and v.numel() == num_classes]
    assert biases, f"no classifier bias of {num_classes} classes found in the DeepLab model"
    for k in biases:
        state["model"][k] = torch.full_like(state["model"][k], -100.0)
        state["model"][k][2] = 100.0
    torch.save(state, model)
    snakemake(
        tiny_run,
        "--configfile",
        str(TINY),
        "--cores",
        "2",
        "--show-failed-logs",
        "-R",
        "deeplab_predict_shard",
        f"{RUN}/deeplab/metrics.csv",
    )

    after = {i: read_label_png(pred_dir / f"{i}.png") for i in ids}
    assert all((a == 2).all() for a in after.values()), "predictions are not the new model's"
    assert any(not np.array_equal(before[i], after[i]) for i in ids)
    metrics_after = pd.read_csv(run / "deeplab" / "metrics.csv")
    assert metrics_after["miou"].iloc[0] != metrics_before["miou"].iloc[0]


@pytest.mark.slow
def test_damaged_cam_shard_names_file_and_image(tiny_run):
    """A flipped byte inside one image's CAM chunk: the next stage that reads it fails naming the
    shard file and the image (Fletcher-32), instead of a bare h5py error or silently wrong maps."""
    import h5py

    shard = tiny_run / RUN / "cams" / "shard-2-of-2.h5"
    original = shard.read_bytes()
    with h5py.File(shard, "r") as f:
        image_id = sorted(f.keys())[0]
        ds = f[image_id]["high_res"]
        offset = ds.id.get_chunk_info(0).byte_offset
    data = bytearray(original)
    data[offset + 10] ^= 0xFF
    shard.write_bytes(bytes(data))
    try:
        proc = snakemake(
            tiny_run,
            "--configfile",
            str(TINY),
            "--cores",
            "2",
            "--show-failed-logs",
            "-R",
            "seed_eval",
            f"{RUN}/seeds/threshold_sweep.csv",
            check=False,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "shard-2-of-2.h5" in out and image_id in out and "DataError" in out, out[-3000:]
    finally:
        shard.write_bytes(original)


@pytest.mark.slow
def test_nan_label_stops_training_naming_file_row_and_column(tiny_run):
    """A NaN in labels.csv (it used to become a *present* class) stops the first job that reads it."""
    labels = tiny_run / "results" / "synthetic-tiny" / "labels.csv"
    lines = labels.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[3].split(",")
    row[2] = "nan"
    lines[3] = ",".join(row)
    original = labels.read_bytes()
    labels.write_text("\n".join(lines) + "\n")
    try:
        proc = snakemake(
            tiny_run,
            "--configfile",
            str(TINY),
            "--cores",
            "2",
            "--show-failed-logs",
            f"{RUN}/deeplab/metrics.csv",
            check=False,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "labels.csv" in out and "line 4" in out and repr(header[2]) in out and "0 or 1" in out, out[-3000:]
    finally:
        labels.write_bytes(original)


def test_ablation_preset_dry_run(tmp_path):
    """configs/ablations.yaml (KTSE Table 6, AEFT Table 2, HFPL Table 4 rows x 3 seeds) builds its DAG."""
    out = snakemake(
        tmp_path, "--configfile", str(REPO / "config.yaml"), str(REPO / "configs" / "ablations.yaml"), "-n"
    ).stdout
    counts = job_counts(out)
    assert counts["train_classifier"] == (16 + 1) * 3 and counts["summary_table"] == 1, out  # + config.yaml's baseline
