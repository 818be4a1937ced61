"""Stage functions on the tiny dataset: bad inputs give clear errors naming the file or key."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest

from wsss.data import open_dataset
from wsss.data.base import write_labels_csv
from wsss.data.classification import select_labelled
from wsss.io import DataError
from wsss.methods import build_classifier
from wsss.pipeline import train_classifier


def _labels_csv(cfg, path, mutate=None):
    ds = open_dataset(cfg)
    ids = ds.ids("train_aug") + ds.ids("val")
    labels = {i: ds.labels(i) for i in ids}
    if mutate:
        mutate(labels)
    write_labels_csv(path, ids, labels, ds.class_names)
    return ds, ids


def test_corrupt_image_is_named(tiny_cfg, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_cfg["dataset"]["root"], root)
    cfg = copy.deepcopy(tiny_cfg)
    cfg["dataset"]["root"] = str(root)
    ds, _ = _labels_csv(cfg, tmp_path / "labels.csv")
    victim = ds.ids("train_aug")[0]
    ds.image_path(victim).write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DataError, match=f"cannot read image .*{victim}.jpg"):
        ds.load_image(victim)
    cfg["classifier"]["epochs"] = 1
    with pytest.raises(DataError, match=f"{victim}.jpg"):
        train_classifier(cfg, str(tmp_path / "labels.csv"), str(tmp_path / "m.pt"), str(tmp_path / "w"), progress=False)


def test_missing_mask_is_named(tiny_cfg):
    ds = open_dataset(tiny_cfg)
    with pytest.raises(DataError, match="label map not found: .*nope.png"):
        ds.load_mask("nope")


def test_image_without_labels(tiny_cfg, tmp_path):
    first = open_dataset(tiny_cfg).ids("train_aug")[0]

    def clear(labels):
        labels[first] = np.zeros_like(labels[first])

    ds, ids = _labels_csv(tiny_cfg, tmp_path / "labels.csv", clear)
    from wsss.data.base import read_labels_csv

    labels = read_labels_csv(tmp_path / "labels.csv", ds.class_names)
    with pytest.raises(DataError, match=f"no image-level label.*{first}.*on_unlabelled: skip"):
        select_labelled(ds.ids("train_aug"), labels, "error")
    kept = select_labelled(ds.ids("train_aug"), labels, "skip")
    assert first not in kept and len(kept) == len(ds.ids("train_aug")) - 1


def test_unknown_backbone_lists_names(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg["classifier"]["backbone"] = "alexnet"
    with pytest.raises(KeyError, match="unknown backbone 'alexnet'; valid names: .*resnet18"):
        build_classifier(cfg, 8)


def test_stale_checkpoint_is_set_aside(tiny_cfg, tmp_path, monkeypatch):
    """A resume checkpoint of another config is kept under another name, not resumed or deleted."""
    import wsss.engine

    _labels_csv(tiny_cfg, tmp_path / "labels.csv")
    cfg = copy.deepcopy(tiny_cfg)
    cfg["classifier"]["epochs"] = 1
    work = tmp_path / "w"
    with monkeypatch.context() as mp:  # killed after its last checkpoint, before the checkpoint is discarded
        mp.setattr(wsss.engine, "discard_checkpoints", lambda *a: None)
        train_classifier(cfg, str(tmp_path / "labels.csv"), str(tmp_path / "m.pt"), str(work), progress=False)
    assert (work / "last.pt").exists()
    cfg["classifier"]["lr"] = 0.05
    train_classifier(cfg, str(tmp_path / "labels.csv"), str(tmp_path / "m2.pt"), str(work), progress=False)
    # the other config's checkpoint is kept aside; the new run's own one is gone once m2.pt is written
    assert len(list(work.glob("last.stale-*.pt"))) == 1 and not (work / "last.pt").exists()


def test_deeplab_training_under_torchrun_with_two_processes(tiny_cfg, tmp_path):
    """gpus > 1: the stage re-launches itself with torchrun (2 CPU processes, gloo DDP); rank 0 writes."""
    from wsss.config import run_config
    from wsss.engine import load_model_state
    from wsss.pipeline import launch_deeplab_training
    from wsss.workflow.markers import write_shard_marker

    cfg = run_config(tiny_cfg, "baseline/s0")
    cfg["deeplab"].update(epochs=1, batch_size=4, crop_size=32)
    marker = tmp_path / "masks.json"  # ground-truth maps stand in for pseudo-masks here
    write_shard_marker(marker, kind="irn", ids=[], mask_dir=tiny_cfg_root(cfg) / "SegmentationClassAug", resolved={})
    out = launch_deeplab_training(
        cfg, [str(marker)], [], str(tmp_path / "model.pt"), str(tmp_path / "work"), threads=2, gpus=2
    )
    assert load_model_state(out)["model"]
    assert (tmp_path / "work" / "torchrun_args.json").exists()


def tiny_cfg_root(cfg):
    from pathlib import Path

    return Path(cfg["dataset"]["root"])
