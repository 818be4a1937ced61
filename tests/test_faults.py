"""Faults a hostile user meets: forced reruns, interrupted shard jobs, bad labels, damaged caches.

Unit cases first; the end-to-end ones run the tiny preset's DAG once (module fixture) and then
damage it the way a user would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from wsss.workflow.journal import ShardJournal, journal_for


def test_journal_resumes_only_an_interrupted_attempt_of_the_same_job(tmp_path):
    path = tmp_path / "shard-1-of-2.json.journal"
    j = ShardJournal(path, {"config_hash": "abc", "inputs": {"a.h5": [1, 2, 3]}})
    assert j.start() == set()
    j.record("img1")
    j.record("img2")
    j.close()  # killed here: the journal stays
    again = ShardJournal(path, {"config_hash": "abc", "inputs": {"a.h5": [1, 2, 3]}})
    assert again.start() == {"img1", "img2"}
    assert again.start(lambda i: i == "img2") == {"img1", "img2"}  # started already: same answer
    again.close()
    # a file that disappeared is redone
    assert ShardJournal(path, again.identity).start(lambda i: i == "img2") == {"img2"}
    # other inputs (an upstream job reran): nothing is reused, and the old journal is replaced
    other = ShardJournal(path, {"config_hash": "abc", "inputs": {"a.h5": [1, 2, 4]}})
    assert other.start() == set()
    other.close()
    assert ShardJournal(path, again.identity).start() == set()
    # a finished job leaves no journal: its next run (forced) starts from nothing
    done = ShardJournal(path, again.identity)
    done.start()
    done.record("img1")
    done.finish()
    assert not path.exists()
    assert ShardJournal(path, again.identity).start() == set()


def test_garbage_journal_is_ignored(tmp_path):
    path = tmp_path / "j"
    path.write_bytes(b"\xff\xfe not json\nimg1\n")
    assert ShardJournal(path, {"a": 1}).start() == set()
    path.write_text("")
    assert ShardJournal(path, {"a": 1}).start() == set()


def test_journal_identity_follows_the_input_files(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"one")
    a = journal_for(tmp_path / "m.json", config_hash="h", inputs=[f])
    a.start()
    a.record("x")
    a.close()
    assert journal_for(tmp_path / "m.json", config_hash="h", inputs=[f]).start() == {"x"}
    # the model is retrained (written to a temp name and renamed into place)
    tmp = tmp_path / ".tmp-model.pt"
    tmp.write_bytes(b"two")
    os.replace(tmp, f)
    assert journal_for(tmp_path / "m.json", config_hash="h", inputs=[f]).start() == set()
    assert journal_for(tmp_path / "m.json", config_hash="other", inputs=[f]).start() == set()


# --------------------------------------------------------------------------------------------
# end to end on the tiny preset (DeepLab trained on the CAM seeds: the shortest whole chain)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
RUN = "results/synthetic-tiny/baseline/s0"


def _snakemake(workdir: Path, *args: str, check: bool = True):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(TINY), "--config", "deeplab={pseudo_masks: seeds}", "--cores", "2",
           "--show-failed-logs", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("faults")
    _snakemake(work, f"{RUN}/deeplab/metrics.csv")
    return work


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
    num_classes = len(pd.read_csv(tiny_run / "results" / "synthetic-tiny" / "labels.csv", nrows=1).columns)  # image_id + fg
    biases = [k for k, v in state["model"].items() if k.endswith("bias") and v.ndim == 1 and v.numel() == num_classes]
    assert biases, f"no classifier bias of {num_classes} classes found in the DeepLab model"
    for k in biases:
        state["model"][k] = torch.full_like(state["model"][k], -100.0)
        state["model"][k][2] = 100.0
    torch.save(state, model)
    _snakemake(tiny_run, "-R", "deeplab_predict_shard", f"{RUN}/deeplab/metrics.csv")

    after = {i: read_label_png(pred_dir / f"{i}.png") for i in ids}
    assert all((a == 2).all() for a in after.values()), "predictions are not the new model's"
    assert any(not np.array_equal(before[i], after[i]) for i in ids)
    metrics_after = pd.read_csv(run / "deeplab" / "metrics.csv")
    assert metrics_after["miou"].iloc[0] != metrics_before["miou"].iloc[0]


def test_unlabelled_images_are_skipped_by_every_stage_on_coco(tmp_path):
    """COCO has images without any label: with ``classifier.on_unlabelled: skip`` the CAM stage
    records them as skipped and CRF, seeds, IR labels and every evaluation leave them out; with
    ``error`` CAM inference names them (it used to crash interpolating a 0-channel map)."""
    import pandas as pd
    from test_coco import write_mini_coco

    from wsss.cams import CamStore
    from wsss.config import run_config, validate_config
    from wsss.data import open_dataset
    from wsss.data.base import write_labels_csv
    from wsss.data.coco import prepare_coco_dataset
    from wsss.engine import save_model
    from wsss.io import DataError
    from wsss.methods import build_classifier
    from wsss.pipeline import (cam_ids, crf_shard, evaluate_mask_shards, evaluate_seeds, infer_cam_shard, ir_labels_shard,
                               seed_masks_shard)
    from wsss.workflow.markers import read_shard_markers_full

    root = write_mini_coco(tmp_path / "coco")
    prepare_coco_dataset(root, crowd="background", progress=False)

    def config(on_unlabelled):
        raw = {"dataset": {"name": "coco14", "root": str(root), "train_split": "train", "eval_split": "val"},
               "classifier": {"on_unlabelled": on_unlabelled}, "cam": {"scales": [1.0]}, "seed_eval": {"gallery_images": 1}}
        return run_config(validate_config(raw), "baseline/s0")

    cfg = config("skip")
    ds = open_dataset(cfg)
    ids = cam_ids(cfg, ds)
    assert ids == ["9", "25", "30", "42"]  # 25: only a crowd region, 30: no annotation
    labels_csv = tmp_path / "labels.csv"
    write_labels_csv(labels_csv, ids, {i: ds.labels(i) for i in ids}, ds.class_names)
    model = tmp_path / "model.pt"
    save_model(model, build_classifier(cfg, ds.num_fg_classes), {})

    with pytest.raises(DataError, match=r"no image-level label.*'25'.*on_unlabelled: skip"):
        infer_cam_shard(config("error"), str(model), str(labels_csv), str(tmp_path / "err.h5"), 0, 1, progress=False)

    cam = tmp_path / "cams" / "shard-1-of-1.h5"
    infer_cam_shard(cfg, str(model), str(labels_csv), str(cam), 0, 1, progress=False)
    with CamStore([cam]) as store:
        assert sorted(store.ids()) == ["42", "9"] and store.skipped == {"25", "30"}
    evaluate_seeds(cfg, [str(cam)], str(tmp_path / "seeds" / "sweep.csv"), str(tmp_path / "seeds" / "g.png"), progress=False)
    assert len(pd.read_csv(tmp_path / "seeds" / "sweep.csv")) > 0
    crf_marker = tmp_path / "crf" / "shard-1-of-1.json"
    crf_shard(cfg, [str(cam)], str(crf_marker), 0, 1, progress=False)
    seed_marker = tmp_path / "seeds" / "masks" / "shard-1-of-1.json"
    seed_masks_shard(cfg, [str(cam)], str(tmp_path / "seeds" / "sweep.csv"), str(seed_marker), 0, 1)
    ir_marker = tmp_path / "ir" / "shard-1-of-1.json"
    ir_labels_shard(cfg, [str(cam)], str(ir_marker), 0, 1, progress=False)
    for marker in (crf_marker, seed_marker, ir_marker):
        mask_dir, written, skipped = read_shard_markers_full([marker])
        assert sorted(written) == ["42", "9"] and skipped == {"25", "30"}, marker
        assert sorted(p.stem for p in mask_dir.glob("*.png")) == ["42", "9"]
        row = evaluate_mask_shards(cfg, [str(marker)], str(marker.parent / "m.csv"), str(marker.parent / "pc.csv"), kind="crf")
        assert 0 <= row["miou"] <= 1


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
        proc = _snakemake(tiny_run, "-R", "seed_eval", f"{RUN}/seeds/threshold_sweep.csv", check=False)
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
        proc = _snakemake(tiny_run, f"{RUN}/deeplab/metrics.csv", check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "labels.csv" in out and "line 4" in out and repr(header[2]) in out and "0 or 1" in out, out[-3000:]
    finally:
        labels.write_bytes(original)
