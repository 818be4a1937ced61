"""Stage functions called by the rule scripts: each takes a validated (experiment) config and the
paths Snakemake gives it, builds the objects and runs one step. No logic of their own beyond wiring.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from . import __version__
from .config import config_hash, stage_config
from .data import open_dataset, split_union
from .data.base import read_labels_csv
from .data.classification import ClassificationTrainSet, select_labelled
from .data.transforms import TrainTransform
from .engine import load_model_state, train, train_config_from
from .methods.base import Method, build_method
from .models import build_backbone

log = logging.getLogger(__name__)


def device_and_workers(threads: int) -> tuple[torch.device, int]:
    """The device (CUDA when present) and DataLoader workers for a job given ``threads`` cores."""
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, max(0, threads - 1)


def build_classifier(cfg: Mapping[str, Any], num_classes: int, pretrained: Optional[str] = None) -> Method:
    """The configured method with its backbone (``pretrained`` overrides the config, e.g. 'none'
    when loading a trained model)."""
    c = cfg["classifier"]
    backbone = build_backbone(c["backbone"], pretrained=pretrained or c["pretrained"], **c["backbone_options"])
    return build_method(c["method"], num_classes=num_classes, backbone=backbone, **c["method_options"])


def classifier_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    return stage_config(cfg, "classifier")


def train_classifier(cfg: Mapping[str, Any], labels_csv: str, model_out: str, work_dir: str, threads: int = 1, progress: bool = True) -> Path:
    """Train the experiment's classifier; resumes from ``work_dir/last.pt`` of the same config."""
    resolved = classifier_config(cfg)
    c = cfg["classifier"]
    ds = open_dataset(cfg)
    labels = read_labels_csv(labels_csv, ds.class_names)
    ids = select_labelled(ds.ids(cfg["dataset"]["train_split"]), labels, c["on_unlabelled"])
    transform = TrainTransform(resize_long=tuple(c["resize_long"]), crop_size=c["crop_size"], hflip=c["hflip"])
    train_set = ClassificationTrainSet(ds, ids, labels, transform, seed=c["seed"])
    _set_aside_stale_checkpoint(Path(work_dir) / "last.pt", resolved)
    torch.manual_seed(c["seed"])
    method = build_classifier(cfg, ds.num_fg_classes)
    device, workers = device_and_workers(threads)
    log.info("training %s (%s) on %d images of %s, device %s, %d workers", c["method"], c["backbone"], len(ids), cfg["dataset"]["name"], device, workers)
    return train(
        method, train_set, train_config_from(c), Path(model_out), Path(work_dir), resolved_config=resolved,
        device=device, num_workers=workers, progress=progress,
    )


def _set_aside_stale_checkpoint(path: Path, resolved: Mapping[str, Any]) -> None:
    """A resume checkpoint of another config is renamed (never deleted) and training starts over."""
    if not path.exists():
        return
    from .engine import load_checkpoint

    old = load_checkpoint(path).get("config_hash")
    if old != config_hash(resolved):
        stale = path.with_name(f"last.stale-{old}.pt")
        os.replace(path, stale)
        log.warning("checkpoint %s belongs to another config; kept as %s, starting over", path, stale)


def load_classifier(cfg: Mapping[str, Any], model_path: str, num_classes: int) -> Method:
    state = load_model_state(Path(model_path))
    method = build_classifier(cfg, num_classes, pretrained="none")
    method.load_state_dict(state["model"])
    return method


def cam_ids(cfg: Mapping[str, Any], ds) -> list:
    """Images that get CAMs: the training split plus the evaluation split."""
    return split_union(ds, [cfg["dataset"]["train_split"], cfg["dataset"]["eval_split"]])


def infer_cam_shard(cfg: Mapping[str, Any], model_path: str, labels_csv: str, out_path: str, shard_index: int, num_shards: int, threads: int = 1, progress: bool = True) -> Path:
    from .cam_infer import infer_cams, shard_ids

    ds = open_dataset(cfg)
    labels = read_labels_csv(labels_csv, ds.class_names)
    ids = shard_ids(cam_ids(cfg, ds), shard_index, num_shards)
    method = load_classifier(cfg, model_path, ds.num_fg_classes)
    device, workers = device_and_workers(threads)
    c = cfg["cam"]
    return infer_cams(
        method, ds, ids, labels, Path(out_path), scales=c["scales"], flip=c["flip"], normalisation=c["normalisation"],
        resolved_config=stage_config(cfg, "classifier", "cam"), shard_index=shard_index, num_shards=num_shards,
        device=device, num_workers=workers, progress=progress,
    )


def evaluate_seeds(cfg: Mapping[str, Any], cam_paths: Sequence[str], out_csv: str, gallery_png: str, progress: bool = True):
    """Threshold sweep on the evaluation split (CSV) and a CAM overlay gallery (PNG)."""
    import numpy as np

    from .cams import CamStore
    from .seeds import cam_to_label, chosen_threshold, sweep_table, sweep_thresholds, write_table
    from .viz import cam_overlay_rows, gallery

    ds = open_dataset(cfg)
    split = cfg["dataset"]["eval_split"]
    ids = ds.ids(split)
    with CamStore(cam_paths) as store:
        cms = sweep_thresholds(store, ds, ids, cfg["seed_eval"]["thresholds"], progress=progress)
        df = sweep_table(cms, ds.class_names, split)
        df["package_version"] = __version__
        df["config_hash"] = store.attrs["config_hash"]
        write_table(df, out_csv)
        t = chosen_threshold(df)
        rng = np.random.default_rng(0)
        pick = sorted(rng.choice(len(ids), size=min(cfg["seed_eval"]["gallery_images"], len(ids)), replace=False))
        rows, captions = [], []
        for i in pick:
            rec = store[ids[i]]
            img, gt = ds.load_image(ids[i]), ds.load_mask(ids[i])
            rows.append(cam_overlay_rows(img, gt, rec.high_res, rec.keys, cam_to_label(rec.high_res, rec.keys, t)))
            captions.append(f"{ids[i]}: " + ", ".join(ds.class_names[k + 1] for k in rec.keys))
        gallery(rows, gallery_png, titles=["image", "ground truth", "CAM 1", "CAM 2", "CAM 3", f"seed (t={t:g})"], row_labels=captions)
    return df
