"""Which jobs a config change reruns: each stage's params are exactly the keys it depends on.

The tiny preset's DAG is "run" with ``snakemake --touch`` on empty output files (that records
Snakemake's metadata, params included, in seconds); then each case changes one key through an
extra config file and checks the dry run's job list.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_workflow import job_counts

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def _snakemake(workdir: Path, *args: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(TINY),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def touched(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("rerun")
    summary = _snakemake(work, "--summary")
    for line in summary.splitlines()[1:]:
        path = line.split("\t")[0]
        if "\t" in line and path:
            f = work / path
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()
    _snakemake(work, "--touch", "--cores", "1")
    assert "Nothing to be done" in _snakemake(work, "-n")
    return work


def dry_run_with(work: Path, tmp_path: Path, override: dict) -> dict:
    extra = tmp_path / "override.yaml"
    extra.write_text(yaml.safe_dump(override))
    return job_counts(_snakemake(work, "-n", "--configfile", str(TINY), str(extra)))


DOWNSTREAM_OF_IRN_MASKS = {
    "irn_masks_shard",
    "eval_masks",
    "mask_gallery",
    "irn_gallery",
    "train_deeplab",
    "deeplab_predict_shard",
    "eval_deeplab",
    "summary_table",
    "training_curves",
    "all",
}

CASES = {
    # CAM inference (the ReLU/resize order): the CAMs and everything after them; the classifier is kept
    "cam.upsample": (
        {"cam": {"upsample": "raw_then_relu"}},
        DOWNSTREAM_OF_IRN_MASKS
        | {"cam_shard", "seed_eval", "seed_masks_shard", "crf_shard", "ir_labels_shard", "train_irn"},
    ),
    # IRN inference: the masks and what trains on them; IRN is not retrained
    "irn.infer": ({"irn": {"infer": {"pad_to": 0, "beta": 7}}}, DOWNSTREAM_OF_IRN_MASKS),
    # IRN training: IRN and after; the IR labels are kept
    "irn.train": ({"irn": {"train": {"epochs": 2}}}, DOWNSTREAM_OF_IRN_MASKS | {"train_irn"}),
    # IR labels: labels, their evaluation, IRN and after; CAMs and CRF are kept
    "irn.ir_label": (
        {"irn": {"ir_label": {"fg_thresh": 0.35}}},
        DOWNSTREAM_OF_IRN_MASKS | {"train_irn", "ir_labels_shard"},
    ),
    # CRF: its masks, their evaluation and gallery; DeepLab trains on IRN masks, so it is kept
    "crf": ({"crf": {"alpha": 8}}, {"crf_shard", "eval_masks", "mask_gallery", "summary_table", "all"}),
    # CRF background fixed instead of from the chosen seed threshold (the default): the CRF jobs
    "crf.from_seeds": (
        {"crf": {"from_seeds": False}},
        {"crf_shard", "eval_masks", "mask_gallery", "summary_table", "all"},
    ),
    # DeepLab test-time keys: prediction and evaluation, not training
    "deeplab.test": (
        {"deeplab": {"test_scales": [1.0, 0.5]}},
        {"deeplab_predict_shard", "eval_deeplab", "summary_table", "all"},
    ),
    # DeepLab evaluation keys: the evaluation only
    "deeplab.eval": ({"deeplab": {"gallery_images": 2}}, {"eval_deeplab", "summary_table", "all"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_key_reruns_only_its_stage(touched, tmp_path, case):
    override, expected = CASES[case]
    counts = dry_run_with(touched, tmp_path, override)
    assert set(counts) == expected, counts


@pytest.mark.slow
def test_shard_count_is_not_a_param(touched, tmp_path):
    """More CRF shards: new shard jobs (their outputs have new names) and the evaluation of their
    markers, nothing upstream; the masks keep their folder (the config hash leaves `shards` out)."""
    counts = dry_run_with(touched, tmp_path, {"crf": {"shards": 3}})
    assert counts["crf_shard"] == 3 and set(counts) == {
        "crf_shard",
        "eval_masks",
        "mask_gallery",
        "summary_table",
        "all",
    }, counts


# AffinityNet runs for experiments with deeplab.pseudo_masks: affinitynet: its own touched DAG
AFFINITYNET = {"deeplab": {"pseudo_masks": "affinitynet"}}
DOWNSTREAM_OF_AFFINITYNET_MASKS = {
    "affinitynet_masks_shard",
    "eval_masks",
    "train_deeplab",
    "deeplab_predict_shard",
    "eval_deeplab",
    "summary_table",
    "training_curves",
    "all",
}
AFFINITYNET_CASES = {
    # the random walk: the masks and what trains on them; AffinityNet is not retrained
    "affinitynet.infer": ({"affinitynet": {"infer": {"alpha": 8.0}}}, DOWNSTREAM_OF_AFFINITYNET_MASKS),
    # training: AffinityNet and after; its labels, the classifier and the CAMs are kept
    "affinitynet.train": (
        {"affinitynet": {"train": {"lr": 0.05}}},
        DOWNSTREAM_OF_AFFINITYNET_MASKS | {"train_affinitynet"},
    ),
    # the CRF label pairs: labels, training and after
    "affinitynet.label": (
        {"affinitynet": {"label": {"high_alpha": 24.0}}},
        DOWNSTREAM_OF_AFFINITYNET_MASKS | {"train_affinitynet", "affinity_labels_shard"},
    ),
}


@pytest.fixture(scope="module")
def touched_affinitynet(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("rerun_affinitynet")
    extra = work / "affinitynet.yaml"
    extra.write_text(yaml.safe_dump(AFFINITYNET))
    summary = _snakemake(work, str(extra), "--summary")
    for line in summary.splitlines()[1:]:
        path = line.split("\t")[0]
        if "\t" in line and path:
            f = work / path
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()
    _snakemake(work, str(extra), "--touch", "--cores", "1")
    assert "Nothing to be done" in _snakemake(work, str(extra), "-n")
    return work


def _with_affinitynet(override: dict) -> dict:
    return {**override, **AFFINITYNET}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(AFFINITYNET_CASES))
def test_one_affinitynet_key_reruns_only_its_stage(touched_affinitynet, tmp_path, case):
    override, expected = AFFINITYNET_CASES[case]
    counts = dry_run_with(touched_affinitynet, tmp_path, _with_affinitynet(override))
    assert set(counts) == expected, counts


@pytest.mark.slow
def test_affinitynet_shard_count_reruns_no_upstream_stage(touched_affinitynet, tmp_path):
    """More AffinityNet shards: new shard jobs and what reads their markers; the classifier, the CAMs
    and the other refinements are kept (the hash of each stage leaves ``shards`` out)."""
    counts = dry_run_with(touched_affinitynet, tmp_path, _with_affinitynet({"affinitynet": {"shards": 3}}))
    assert counts["affinity_labels_shard"] == 3 and counts["affinitynet_masks_shard"] == 3, counts
    assert not {"train_classifier", "cam_shard", "crf_shard", "ir_labels_shard", "train_irn", "irn_masks_shard"} & set(
        counts
    ), counts


def test_affinitynet_experiment_dry_run(tmp_path):
    """An experiment with ``deeplab.pseudo_masks: affinitynet`` builds the AffinityNet jobs (only for
    itself) and trains DeepLab on their masks; the IRN baseline beside it has none."""
    extra = tmp_path / "experiments.yaml"
    extra.write_text(yaml.safe_dump({"experiments": {"baseline": {}, "aff": AFFINITYNET}}))
    out = _snakemake(tmp_path, str(extra), "-n")
    counts = job_counts(out)
    assert counts["train_classifier"] == 2 and counts["train_deeplab"] == 2, counts
    assert (
        counts["affinity_labels_shard"] == 2
        and counts["train_affinitynet"] == 1
        and counts["affinitynet_masks_shard"] == 2
    ), counts
    assert counts["eval_masks"] == 3 + 4, counts  # crf, ir_labels, irn for both; affinitynet for aff
    run = "results/synthetic-tiny/aff/s0"
    assert f"{run}/affinitynet/masks/metrics.csv" in out and "results/synthetic-tiny/baseline/s0/affinitynet" not in out
    jobs = re.split(r"\n(?=(?:local)?rule \w+:)", out)
    deeplab_job = next(
        job for job in jobs if job.startswith("rule train_deeplab:") and f"{run}/deeplab/model.pt" in job
    )
    assert f"{run}/affinitynet/masks/shard-1-of-2.json" in deeplab_job and "irn/masks" not in deeplab_job, deeplab_job


def test_stage_params_leave_scatter_counts_out(tiny_cfg):
    import copy

    from wsss.config import config_hash
    from wsss.workflow.stages import STAGES, stage_params

    other = copy.deepcopy(tiny_cfg)
    for section in ("cam", "crf", "irn", "affinitynet", "deeplab"):
        other[section]["shards"] = 7
    for stage in STAGES:
        a, b = stage_params(tiny_cfg, stage), stage_params(other, stage)
        assert config_hash(a) == config_hash(b), stage
        assert stage_params(a, stage) == a, f"{stage}: not idempotent on its own params"
    with pytest.raises(KeyError, match="valid stages"):
        stage_params(tiny_cfg, "nope")
    assert "test_scales" not in stage_params(tiny_cfg, "deeplab_train")["deeplab"]
    assert set(stage_params(tiny_cfg, "irn_infer")["irn"]) == {"infer"}
