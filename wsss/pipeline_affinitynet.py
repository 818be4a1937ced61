"""AffinityNet stage functions called by the rule scripts (rules/refine.smk), as :mod:`wsss.pipeline`
does it for IRN: each takes a validated run config and the paths Snakemake gives it and runs one
step of :mod:`wsss.refine.affinitynet` (docs/affinitynet.md).

* :func:`affinity_labels_shard`: the low- and high-alpha CRF label maps of one shard of the CAM
  images (``affinitynet.label``; no torch: the ``crf`` conda env);
* :func:`train_affinitynet_stage`: AffinityNet training on the training split (``affinitynet.train``;
  ``pretrained: classifier`` is the run's classifier model file);
* :func:`affinitynet_masks_shard`: random-walk pseudo-masks of one shard (``affinitynet.infer``).

The shard stages write PNGs into a folder named after their config hash and a JSON marker (the
tracked output, :mod:`wsss.workflow.markers`); a journal lets an interrupted shard resume.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

from .data import open_dataset
from .pipeline import CamShardJob, stored_ids
from .workflow.jobs import device_and_workers, set_aside_stale_checkpoint
from .workflow.markers import read_shard_markers_full
from .workflow.stages import stage_params

log = logging.getLogger(__name__)


def affinitynet_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """What AffinityNet *training* depends on (``affinitynet_train``); its labels are input files."""
    return stage_params(cfg, "affinitynet_train")


def affinitynet_train_params(cfg: Mapping[str, Any], classifier_model: str) -> Dict[str, Any]:
    """The ``affinitynet.train`` parameters with ``pretrained: classifier`` replaced by the
    classifier's model file (its backbone weights)."""
    params = dict(cfg["affinitynet"]["train"])
    if params.get("pretrained") == "classifier":
        params["pretrained"] = str(classifier_model)
    return params


def affinity_labels_shard(
    cfg: Mapping[str, Any],
    cam_paths: Sequence[str],
    marker: str,
    shard_index: int,
    num_shards: int,
    threads: int = 1,
    progress: bool = True,
) -> Path:
    """The two CRF label maps (``la/``, ``ha/``) of one shard of the CAM images, resumable."""
    from .refine.affinity_labels import make_affinity_labels

    resolved = stage_params(cfg, "affinity_labels")
    with CamShardJob(cfg, resolved, "affinity_labels", cam_paths, marker, shard_index, num_shards) as job:
        stats = make_affinity_labels(
            job.ds,
            job.store,
            job.ids,
            job.out_dir,
            cfg["affinitynet"]["label"],
            workers=threads,
            progress=progress,
            journal=job.journal,
        )
    log.info("AffinityNet labels shard %d/%d: %s", shard_index + 1, num_shards, stats)
    return Path(marker)


def train_affinitynet_stage(
    cfg: Mapping[str, Any],
    label_markers: Sequence[str],
    classifier_model: str,
    model_out: str,
    work_dir: str,
    cam_paths: Sequence[str] = (),
    threads: int = 1,
    progress: bool = True,
) -> Path:
    """AffinityNet trained on the training split's label pairs; resumes from ``work_dir/last.pt``
    of the same config (one of another config is set aside). ``cam_paths``: the CAM shards, read
    only by AEFT's model selection (``affinitynet.train.select``)."""
    from .cams import CamStore
    from .refine.affinitynet import train_affinitynet

    ds = open_dataset(cfg)
    label_dir, _, skipped = read_shard_markers_full(label_markers)
    ids = stored_ids(ds.ids(cfg["dataset"]["train_split"]), skipped)
    device, workers = device_and_workers(threads)
    resolved = affinitynet_config(cfg)
    set_aside_stale_checkpoint(Path(work_dir) / "last.pt", resolved)
    select = cfg["affinitynet"]["train"].get("select") is not None
    if select and not cam_paths:
        raise ValueError("affinitynet.train.select needs the CAM shards (cam_paths)")
    with CamStore(cam_paths) if select else contextlib.nullcontext() as store:
        return train_affinitynet(
            ds,
            ids,
            label_dir,
            model_out,
            work_dir,
            affinitynet_train_params(cfg, classifier_model),
            resolved_config=resolved,
            device=device,
            num_workers=workers,
            progress=progress,
            select_store=store,
            infer=cfg["affinitynet"]["infer"] if select else None,
        )


def affinitynet_masks_shard(
    cfg: Mapping[str, Any],
    cam_paths: Sequence[str],
    model_path: str,
    marker: str,
    shard_index: int,
    num_shards: int,
    threads: int = 1,
    progress: bool = True,
) -> Path:
    """Random-walk pseudo-masks of one shard of the CAM images, resumable."""
    from .refine.affinitynet import make_affinitynet_masks

    resolved = stage_params(cfg, "affinitynet_infer")
    device, _ = device_and_workers(threads)
    job = CamShardJob(cfg, resolved, "affinitynet", cam_paths, marker, shard_index, num_shards, inputs=[model_path])
    with job:
        stats = make_affinitynet_masks(
            job.ds,
            job.store,
            job.ids,
            model_path,
            job.out_dir,
            cfg["affinitynet"]["infer"],
            device=device,
            progress=progress,
            journal=job.journal,
        )
    log.info("AffinityNet masks shard %d/%d: %s", shard_index + 1, num_shards, stats)
    return Path(marker)
