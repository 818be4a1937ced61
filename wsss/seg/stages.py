"""Stage functions of the segmentation stage, called by the Snakemake rule scripts.

* :func:`train_segmentation` - train the configured network on pseudo-masks (or the ground truth)
  with :func:`wsss.engine.train`; resumable; under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with
  DDP, one process per GPU.
* :func:`predict_shard` - prediction PNGs for one shard of an id list (an interrupted job resumes
  from its journal), so CPU jobs can run in parallel.
* :func:`evaluate_predictions` - metrics CSVs (+ gallery) from the prediction PNGs
  (:func:`wsss.seg.evaluate.evaluate_predictions`).

``params`` is the config section ``deeplab:`` (see docs/deeplab.md); missing keys take the
schema's defaults (:func:`wsss.config.validate_section`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from .. import __version__
from ..config import validate_section
from ..data.base import SegDataset
from ..engine import load_model_state, train
from ..io import write_json_atomic
from ..workflow.jobs import device_and_workers, set_aside_stale_checkpoint
from ..workflow.journal import NoJournal
from ..workflow.per_image import todo_ids
from .data import SegTrainSet, transform_from_params
from .evaluate import InferenceSettings, evaluate_predictions, predict_to_dir, prediction_path
from .train import SegmentationMethod, build_seg_method, seg_train_config

log = logging.getLogger(__name__)

__all__ = ["train_segmentation", "predict_shard", "evaluate_predictions", "load_seg_method"]


def _dist_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the torchrun environment (1, 0, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def train_segmentation(
    ds: SegDataset,
    train_ids: Sequence[str],
    mask_dir: Optional[str | os.PathLike],
    conf_dir: Optional[str | os.PathLike],
    params: Mapping[str, Any],
    out_path: str | os.PathLike,
    work_dir: str | os.PathLike,
    threads: int = 1,
    resolved_config: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
) -> Path:
    """Train the segmentation network and write its weights to ``out_path``.

    ``mask_dir``: folder of pseudo-mask PNGs; must be ``None`` when ``params.pseudo_masks`` is
    ``gt`` (the dataset's ground truth is used). ``conf_dir``: folder of confidence PNGs, read only
    when ``params.use_confidence`` (then required). ``work_dir`` holds the resume checkpoint
    ``last.pt`` and ``train_log.csv``; a checkpoint of another config is set aside (renamed) and
    training starts over. ``resolved_config`` (default: the resolved ``params``) is recorded in
    the outputs and its hash guards resuming.
    """
    p = validate_section("deeplab", params)
    gt = p["pseudo_masks"] == "gt"
    if gt and mask_dir is not None:
        raise ValueError(
            f"deeplab.pseudo_masks is 'gt' (train on the ground truth) but a pseudo-mask folder was given: {mask_dir}"
        )
    if not gt and mask_dir is None:
        raise ValueError(f"deeplab.pseudo_masks is {p['pseudo_masks']!r} but no pseudo-mask folder was given")
    if p["use_confidence"] and conf_dir is None:
        raise ValueError("deeplab.use_confidence is true but no confidence-mask folder was given")
    if not p["use_confidence"] and conf_dir is not None:
        log.info("deeplab.use_confidence is false: ignoring the confidence masks in %s", conf_dir)
    resolved = dict(resolved_config) if resolved_config is not None else {"deeplab": p}

    world, rank, local_rank = _dist_env()
    device, workers = device_and_workers(max(1, int(threads) // world))  # ``threads``: the whole job
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    train_set = SegTrainSet(
        ds,
        train_ids,
        transform_from_params(p),
        mask_dir=None if gt else Path(mask_dir),
        conf_dir=Path(conf_dir) if (p["use_confidence"] and conf_dir is not None) else None,
        gt=gt,
        seed=p["seed"],
    )
    if rank == 0:
        set_aside_stale_checkpoint(Path(work_dir) / "last.pt", resolved)
    torch.manual_seed(p["seed"])
    method = build_seg_method(p, ds.num_classes)
    log.info(
        "training %s (%s, %s) on %d images (%s), device %s, %d workers, world size %d",
        p["model"],
        p["backbone"],
        p["pretrained"],
        len(train_set),
        "ground truth" if gt else f"pseudo-masks {mask_dir}",
        device,
        workers,
        world,
    )
    return train(
        method,
        train_set,
        seg_train_config(p),
        Path(out_path),
        Path(work_dir),
        resolved_config=resolved,
        device=device,
        num_workers=workers,
        progress=progress and rank == 0,
    )


def load_seg_method(
    model_path: str | os.PathLike,
    params: Mapping[str, Any],
    num_classes: int,
    state: Optional[Mapping[str, Any]] = None,
) -> SegmentationMethod:
    """A trained network from a model file written by :func:`train_segmentation` (``state``: the
    file's already loaded contents)."""
    state = load_model_state(Path(model_path)) if state is None else state
    method = build_seg_method(validate_section("deeplab", params), num_classes, pretrained="none")
    try:
        method.load_state_dict(state["model"])
    except RuntimeError as e:
        raise RuntimeError(
            f"model file {model_path} does not fit the configured network (deeplab.model/backbone): {e}"
        ) from e
    return method


def predict_shard(
    ds: SegDataset,
    ids: Sequence[str],
    model_path: str | os.PathLike,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    shard_index: int = 0,
    num_shards: int = 1,
    threads: int = 1,
    marker_path: Optional[str | os.PathLike] = None,
    progress: bool = True,
    journal: Any = None,
) -> Dict[str, Any]:
    """Write the prediction PNGs ``<out_dir>/<id>.png`` of shard ``shard_index`` of ``ids``.

    Every PNG is (re)written except those an interrupted attempt of the same job recorded in
    ``journal`` (:class:`wsss.workflow.journal.ShardJournal`; None: no resume); the model is not
    even loaded when nothing is left. ``marker_path`` (optional) receives a JSON record of the shard (ids, counts,
    the model's config hash, package version), written last, for the rule's output.
    """
    from ..cam_infer import shard_ids

    p = validate_section("deeplab", params)
    mine = shard_ids(list(ids), shard_index, num_shards)
    journal = journal if journal is not None else NoJournal()
    todo, skipped = todo_ids(mine, journal, lambda i: prediction_path(out_dir, i).exists())
    counts = {"written": 0, "skipped": skipped}
    model_hash = None
    if todo:
        device, workers = device_and_workers(threads)
        state = load_model_state(Path(model_path))
        model_hash = state.get("config_hash")
        method = load_seg_method(model_path, p, ds.num_classes, state=state)
        counts = predict_to_dir(
            method,
            ds,
            mine,
            out_dir,
            InferenceSettings.from_params(p),
            device=device,
            num_workers=workers,
            progress=progress,
            desc=f"predict shard {shard_index + 1}/{num_shards}",
            journal=journal,
        )
    record = {
        "shard_index": shard_index,
        "num_shards": num_shards,
        "images": len(mine),
        **counts,
        "model": str(model_path),
        "model_config_hash": model_hash,
        "package_version": __version__,
    }
    if marker_path is not None:
        write_json_atomic(marker_path, record)
    return record
