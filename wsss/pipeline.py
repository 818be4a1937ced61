"""Stage functions called by the rule scripts: each takes a validated (experiment) config and the
paths Snakemake gives it, builds the objects and runs one step. No logic of their own beyond wiring.

torch and the modules that need it are imported inside the stages that use them: the torch-free
stages (seeds, CRF, IR labels, seed masks, evaluations, galleries) run in the ``data`` and ``crf``
conda envs, which have no torch (tests/test_envs.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence

from . import __version__
from .data import open_dataset, split_union
from .data.base import read_labels_csv
from .data.transforms import TrainTransform
from .io import copy_atomic
from .workflow.adapter import shard_ids
from .workflow.jobs import device_and_workers, set_aside_stale_checkpoint
from .workflow.markers import masks_dir, read_shard_markers, read_shard_markers_full, shard_journal, write_shard_marker
from .workflow.stages import stage_params

if TYPE_CHECKING:
    from .methods.base import Method

log = logging.getLogger(__name__)


def classifier_inputs(cfg: Mapping[str, Any]) -> list:
    """Model files an experiment's classifier training reads besides the data (the method's
    :meth:`~wsss.methods.base.Method.required_files`, e.g. SMAF's teacher) and, for methods that
    train on saliency maps (EPS), the saliency folder or the marker of what makes it
    (:func:`wsss.workflow.paths.saliency_inputs`); Snakemake makes them inputs so the DAG makes
    them first."""
    from .methods import needs_saliency, required_files
    from .workflow.paths import saliency_inputs

    files = required_files(cfg)
    if needs_saliency(cfg):
        files += saliency_inputs(cfg)
    return files


def classifier_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    return stage_params(cfg, "classifier")


def train_classifier(
    cfg: Mapping[str, Any],
    labels_csv: str,
    model_out: str,
    work_dir: str,
    threads: int = 1,
    progress: bool = True,
    log_out: Optional[str] = None,
) -> Path:
    """Train the experiment's classifier; resumes from ``work_dir/last.pt`` of the same config.
    ``log_out``: where to copy the step log (loss terms per step) when training is done."""
    import torch

    from .config import saliency_dir
    from .data.classification import ClassificationTrainSet, select_labelled
    from .engine import train, train_config_from
    from .io import DataError
    from .methods import build_classifier, needs_saliency

    resolved = classifier_config(cfg)
    c = cfg["classifier"]
    ds = open_dataset(cfg)
    labels = read_labels_csv(labels_csv, ds.class_names)
    ids = select_labelled(ds.ids(cfg["dataset"]["train_split"]), labels, c["on_unlabelled"])
    transform = TrainTransform(
        resize_long=tuple(c["resize_long"]),
        crop_size=c["crop_size"],
        hflip=c["hflip"],
        color_jitter=tuple(c["color_jitter"]) if c["color_jitter"] else None,
        color_jitter_p=c["color_jitter_p"],
    )
    saliency = None
    if needs_saliency(cfg):
        saliency = saliency_dir(cfg)
        if not saliency.is_dir():
            raise DataError(
                f"method {c['method']} trains on saliency maps, but the folder {saliency} does not exist; "
                "set saliency.root (docs/methods/eps.md)"
            )
    train_set = ClassificationTrainSet(ds, ids, labels, transform, seed=c["seed"], saliency_dir=saliency)
    set_aside_stale_checkpoint(Path(work_dir) / "last.pt", resolved)
    torch.manual_seed(c["seed"])
    method = build_classifier(cfg, ds.num_fg_classes)
    device, workers = device_and_workers(threads)
    log.info(
        "training %s (%s) on %d images of %s, device %s, %d workers",
        c["method"],
        c["backbone"],
        len(ids),
        cfg["dataset"]["name"],
        device,
        workers,
    )
    out = train(
        method,
        train_set,
        train_config_from(c),
        Path(model_out),
        Path(work_dir),
        resolved_config=resolved,
        device=device,
        num_workers=workers,
        progress=progress,
    )
    publish_train_log(work_dir, log_out)
    return out


def publish_train_log(work_dir: str | os.PathLike, log_out: Optional[str]) -> None:
    """Copy the live step log ``work_dir/train_log.csv`` to the rule's declared ``log_out``.

    The live log stays undeclared: Snakemake deletes a job's declared outputs before it reruns
    the job, and a resumed training appends to the log of the steps already done."""
    if log_out:
        copy_atomic(Path(work_dir) / "train_log.csv", log_out)


def load_classifier(cfg: Mapping[str, Any], model_path: str, num_classes: int) -> Method:
    from .engine import load_model_state
    from .methods import build_classifier

    state = load_model_state(Path(model_path))
    method = build_classifier(cfg, num_classes, pretrained="none")
    method.load_state_dict(state["model"])
    return method


def cam_ids(cfg: Mapping[str, Any], ds) -> list:
    """Images that get CAMs: the training split plus the evaluation split."""
    return split_union(ds, [cfg["dataset"]["train_split"], cfg["dataset"]["eval_split"]])


def infer_cam_shard(
    cfg: Mapping[str, Any],
    model_path: str,
    labels_csv: str,
    out_path: str,
    shard_index: int,
    num_shards: int,
    threads: int = 1,
    progress: bool = True,
) -> Path:
    from .cam_infer import infer_cams
    from .data.classification import select_labelled

    ds = open_dataset(cfg)
    labels = read_labels_csv(labels_csv, ds.class_names)
    mine = shard_ids(cam_ids(cfg, ds), shard_index, num_shards)
    ids = select_labelled(mine, labels, cfg["classifier"]["on_unlabelled"])
    skipped = [i for i in mine if i not in set(ids)]
    method = load_classifier(cfg, model_path, ds.num_fg_classes)
    device, workers = device_and_workers(threads)
    c = cfg["cam"]
    return infer_cams(
        method,
        ds,
        ids,
        labels,
        Path(out_path),
        scales=c["scales"],
        flip=c["flip"],
        normalisation=c["normalisation"],
        upsample=c["upsample"],
        precision=c["precision"],
        channels_last=c["channels_last"],
        resolved_config=stage_params(cfg, "cam"),
        shard_index=shard_index,
        num_shards=num_shards,
        device=device,
        num_workers=workers,
        progress=progress,
        skipped=skipped,
    )


def stored_ids(ids: Sequence[str], skipped: set) -> list:
    """``ids`` without the images the CAM stage skipped (no image-level label,
    ``classifier.on_unlabelled: skip``): every per-image stage after it leaves out the same ones."""
    return [i for i in ids if i not in skipped]


class CamShardJob:
    """One shard job over the CAM images (the per-image stages: CRF, seed masks, IR labels, IRN and
    AffinityNet masks, AffinityNet labels). Use as a context manager: inside, ``ds``, ``store`` (the
    open CAM store), ``ids`` (this shard's images that have CAMs), ``out_dir`` (``masks-<hash>/`` of
    ``resolved``) and ``journal`` (resume of an interrupted attempt of this same job); on a clean
    exit it writes the shard marker (``kind``; images skipped upstream recorded) and ends the journal.
    ``inputs``: files besides the CAM shards whose identity the journal checks (a model, a sweep)."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        resolved: Mapping[str, Any],
        kind: str,
        cam_paths: Sequence[str],
        marker: str,
        shard_index: int,
        num_shards: int,
        inputs: Sequence[str] = (),
    ):
        self.ds = open_dataset(cfg)
        self.resolved, self.kind, self.cam_paths, self.marker = resolved, kind, list(cam_paths), marker
        self.out_dir = masks_dir(Path(marker).parent, resolved)
        self.mine = shard_ids(cam_ids(cfg, self.ds), shard_index, num_shards)
        self.journal = shard_journal(marker, resolved, [*self.cam_paths, *inputs])

    def __enter__(self) -> "CamShardJob":
        from .cams import CamStore

        self._cams = CamStore(self.cam_paths)
        self.store = self._cams.__enter__()
        self.ids = stored_ids(self.mine, self.store.skipped)
        return self

    def __exit__(self, *exc) -> None:
        self._cams.__exit__(*exc)
        if exc[0] is None:
            self.write_marker(self.marker, self.kind, self.out_dir)
            self.journal.finish()

    def write_marker(self, marker: str, kind: str, mask_dir: Path) -> None:
        write_shard_marker(
            marker,
            kind=kind,
            ids=self.ids,
            mask_dir=mask_dir,
            resolved=self.resolved,
            skipped=set(self.mine) - set(self.ids),
        )


def evaluate_seeds(
    cfg: Mapping[str, Any], cam_paths: Sequence[str], out_csv: str, gallery_png: str, progress: bool = True
):
    """Threshold sweep on the evaluation split (CSV) and a CAM overlay gallery (PNG)."""
    import numpy as np

    from .cams import CamStore
    from .seeds import cam_to_label, chosen_threshold, sweep_table, sweep_thresholds, write_table
    from .viz import cam_overlay_rows, gallery

    ds = open_dataset(cfg)
    split = cfg["dataset"]["eval_split"]
    with CamStore(cam_paths) as store:
        ids = stored_ids(ds.ids(split), store.skipped)
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
        gallery(
            rows,
            gallery_png,
            titles=["image", "ground truth", "CAM 1", "CAM 2", "CAM 3", f"seed (t={t:g})"],
            row_labels=captions,
        )
    return df


# --------------------------------------------------------------------------------------------
# mask-producing shards (CRF, IR labels, IRN): PNGs in a folder named after the config hash, one
# JSON marker per shard as the tracked output (wsss.workflow.markers)


def crf_shard(
    cfg: Mapping[str, Any],
    cam_paths: Sequence[str],
    marker: str,
    shard_index: int,
    num_shards: int,
    threads: int = 1,
    progress: bool = True,
    sweep_csv: Optional[str] = None,
) -> Path:
    """CRF masks of one shard of the CAM images (wsss.refine.crf), resumable. ``sweep_csv``: the
    seed threshold sweep, read when ``crf.from_seeds`` is set (the chosen threshold sets the CRF's
    background, and is recorded in the marker)."""
    from .refine.crf import crf_masks_shard, crf_params_for_seeds
    from .seeds import chosen_threshold

    resolved, inputs = stage_params(cfg, "crf"), []
    t = chosen_threshold(sweep_csv) if cfg["crf"]["from_seeds"] and sweep_csv else None
    params = crf_params_for_seeds(cfg["crf"], t)  # refuses from_seeds without a threshold
    if t is not None:
        resolved, inputs = dict(resolved, seed_threshold=t), [sweep_csv]
        log.info("CRF background from the chosen seed threshold %.3g: %s", t, params)
    with CamShardJob(cfg, resolved, "crf", cam_paths, marker, shard_index, num_shards, inputs=inputs) as job:
        stats = crf_masks_shard(
            job.ds, job.store, job.ids, job.out_dir, params, progress=progress, workers=threads, journal=job.journal
        )
    log.info("CRF shard %d/%d: %s", shard_index + 1, num_shards, stats)
    return Path(marker)


def evaluate_mask_shards(
    cfg: Mapping[str, Any], markers: Sequence[str], out_csv: str, out_per_class: str, kind: str
) -> Dict[str, Any]:
    """Metrics (mIoU, precision, recall, coverage, per-class IoU) of masks on the evaluation split."""
    from .metrics import write_metrics_csv
    from .refine.crf import evaluate_masks

    ds = open_dataset(cfg)
    mask_dir, _, skipped = read_shard_markers_full(markers)
    split = cfg["dataset"]["eval_split"]
    cm = evaluate_masks(ds, stored_ids(ds.ids(split), skipped), mask_dir)
    row = {
        "kind": kind,
        "split": split,
        **cm.summary(ds.class_names),
        "package_version": __version__,
        "mask_dir": str(mask_dir),
    }
    write_metrics_csv(out_csv, row)
    table = cm.per_class_table(ds.class_names)
    from .io import atomic_path

    with atomic_path(out_per_class) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return row


def seed_masks_shard(
    cfg: Mapping[str, Any], cam_paths: Sequence[str], sweep_csv: str, marker: str, shard_index: int, num_shards: int
) -> Path:
    """CAM seeds at the chosen background threshold as PNG label maps (a pseudo-mask source)."""
    from .io import voc_palette, write_label_png
    from .seeds import cam_to_label, chosen_threshold
    from .workflow.per_image import map_images

    t = chosen_threshold(sweep_csv)
    resolved = dict(stage_params(cfg, "seed_masks"), seed_threshold=t)
    pal = voc_palette()
    job = CamShardJob(cfg, resolved, "seeds", cam_paths, marker, shard_index, num_shards, inputs=[sweep_csv])
    job.out_dir.mkdir(parents=True, exist_ok=True)
    with job:

        def one(image_id: str) -> None:
            rec = job.store.get(image_id, fields=("keys", "high_res"))
            write_label_png(job.out_dir / f"{image_id}.png", cam_to_label(rec.high_res, rec.keys, t), pal)

        map_images(
            job.ids,
            one,
            exists=lambda i: (job.out_dir / f"{i}.png").exists(),
            journal=job.journal,
            desc="seed masks",
            progress=False,
        )
    return Path(marker)


def deeplab_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """What DeepLab *training* depends on (:func:`wsss.workflow.stages.stage_params`,
    ``deeplab_train``); the pseudo-masks it trains on are input files."""
    return stage_params(cfg, "deeplab_train")


def train_deeplab(
    cfg: Mapping[str, Any],
    mask_markers: Sequence[str],
    conf_markers: Sequence[str],
    model_out: str,
    work_dir: str,
    threads: int = 1,
    progress: bool = True,
) -> Path:
    from .seg.stages import train_segmentation

    ds = open_dataset(cfg)
    p = cfg["deeplab"]
    mask_dir, skipped = None, set()
    if p["pseudo_masks"] != "gt":
        mask_dir, _, skipped = read_shard_markers_full(mask_markers)
    conf_dir = read_shard_markers(conf_markers)[0] if (p["use_confidence"] and conf_markers) else None
    ids = stored_ids(ds.ids(cfg["dataset"]["train_split"]), skipped)
    return train_segmentation(
        ds,
        ids,
        mask_dir,
        conf_dir,
        p,
        model_out,
        work_dir,
        threads=threads,
        resolved_config=deeplab_config(cfg),
        progress=progress,
    )


def deeplab_predict_shard(
    cfg: Mapping[str, Any],
    model_path: str,
    marker: str,
    shard_index: int,
    num_shards: int,
    threads: int = 1,
    progress: bool = True,
) -> Path:
    from .seg.stages import predict_shard

    ds = open_dataset(cfg)
    resolved = stage_params(cfg, "deeplab_predict")
    out_dir = masks_dir(Path(marker).parent, resolved)
    ids = ds.ids(cfg["dataset"]["eval_split"])
    journal = shard_journal(marker, resolved, [model_path])
    predict_shard(
        ds,
        ids,
        model_path,
        cfg["deeplab"],
        out_dir,
        shard_index,
        num_shards,
        threads=threads,
        progress=progress,
        journal=journal,
    )
    write_shard_marker(
        marker, kind="deeplab", ids=shard_ids(ids, shard_index, num_shards), mask_dir=out_dir, resolved=resolved
    )
    journal.finish()
    return Path(marker)


def evaluate_deeplab(
    cfg: Mapping[str, Any],
    markers: Sequence[str],
    metrics_csv: str,
    per_class_csv: str,
    gallery_png: str,
    progress: bool = True,
):
    from .seg.scoring import evaluate_predictions

    ds = open_dataset(cfg)
    pred_dir, _ = read_shard_markers(markers)
    split = cfg["dataset"]["eval_split"]
    return evaluate_predictions(
        ds,
        ds.ids(split),
        pred_dir,
        metrics_csv,
        per_class_csv,
        resolved_config=stage_params(cfg, "deeplab_eval"),
        split=split,
        gallery_png=gallery_png,
        gallery_images=cfg["deeplab"]["gallery_images"],
        bound_th=cfg["deeplab"]["bound_th"],
        extra={"pseudo_masks": cfg["deeplab"]["pseudo_masks"]},
        progress=progress,
    )


# --------------------------------------------------------------------------------------------
# IRN (wsss.refine.irn)


def irn_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """What IRN *training* depends on (``irn_train``); its IR labels are input files."""
    return stage_params(cfg, "irn_train")


def ir_labels_shard(
    cfg: Mapping[str, Any],
    cam_paths: Sequence[str],
    marker: str,
    shard_index: int,
    num_shards: int,
    threads: int = 1,
    progress: bool = True,
) -> Path:
    from .refine.ir_labels import make_ir_labels

    resolved = stage_params(cfg, "ir_labels")
    with CamShardJob(cfg, resolved, "ir_labels", cam_paths, marker, shard_index, num_shards) as job:
        stats = make_ir_labels(
            job.ds,
            job.store,
            job.ids,
            job.out_dir,
            cfg["irn"]["ir_label"],
            workers=threads,
            progress=progress,
            journal=job.journal,
        )
    log.info("IR labels shard %d/%d: %s", shard_index + 1, num_shards, stats)
    return Path(marker)


def irn_backbone_source(cfg: Mapping[str, Any], classifier_model: str) -> Dict[str, Any]:
    """The ``irn.train`` parameters with ``pretrained: classifier`` replaced by the classifier's
    model file (its backbone weights; offline runs have no ImageNet weights)."""
    params = dict(cfg["irn"]["train"])
    if params.get("pretrained") == "classifier":
        params["pretrained"] = str(classifier_model)
    return params


def train_irn_stage(
    cfg: Mapping[str, Any],
    label_markers: Sequence[str],
    classifier_model: str,
    model_out: str,
    work_dir: str,
    threads: int = 1,
    progress: bool = True,
) -> Path:
    from .refine.irn import train_irn

    ds = open_dataset(cfg)
    label_dir, _, skipped = read_shard_markers_full(label_markers)
    ids = stored_ids(ds.ids(cfg["dataset"]["train_split"]), skipped)
    infer_ids = (
        stored_ids(ds.ids("train"), skipped) if "train" in ds.splits() else ids
    )  # IRN: mean shift over infer_list = train
    device, workers = device_and_workers(threads)
    set_aside_stale_checkpoint(Path(work_dir) / "last.pt", irn_config(cfg))
    return train_irn(
        ds,
        ids,
        label_dir,
        model_out,
        work_dir,
        irn_backbone_source(cfg, classifier_model),
        infer_ids=infer_ids,
        resolved_config=irn_config(cfg),
        device=device,
        num_workers=workers,
        progress=progress,
    )


def irn_masks_shard(
    cfg: Mapping[str, Any],
    cam_paths: Sequence[str],
    model_path: str,
    marker: str,
    conf_marker: Optional[str],
    shard_index: int,
    num_shards: int,
    threads: int = 1,
    progress: bool = True,
) -> Path:
    from .refine.irn import make_irn_masks

    resolved = stage_params(cfg, "irn_infer")
    conf_dir = masks_dir(Path(conf_marker).parent, resolved) if conf_marker else None
    device, _ = device_and_workers(threads)
    job = CamShardJob(cfg, resolved, "irn", cam_paths, marker, shard_index, num_shards, inputs=[model_path])
    with job:
        stats = make_irn_masks(
            job.ds,
            job.store,
            job.ids,
            model_path,
            job.out_dir,
            cfg["irn"]["infer"],
            conf_dir=conf_dir,
            device=device,
            progress=progress,
            journal=job.journal,
        )
        if conf_marker:  # written before the job's own marker and the end of its journal
            job.write_marker(conf_marker, "irn_confidence", conf_dir)
    log.info("IRN masks shard %d/%d: %s", shard_index + 1, num_shards, stats)
    return Path(marker)


def mask_gallery(
    cfg: Mapping[str, Any],
    seed_markers: Sequence[str],
    crf_markers: Sequence[str],
    irn_markers: Sequence[str],
    out_png: str,
    n_images: int = 6,
) -> None:
    """Image | ground truth | seed | CRF | IRN pseudo-masks for a few images of the evaluation split."""
    import numpy as np

    from .io import read_label_png
    from .viz import gallery, overlay_labels

    ds = open_dataset(cfg)
    dirs = [read_shard_markers(m)[0] for m in (seed_markers, crf_markers, irn_markers)]
    ids = stored_ids(ds.ids(cfg["dataset"]["eval_split"]), read_shard_markers_full(seed_markers)[2])
    pick = sorted(np.random.default_rng(0).choice(len(ids), size=min(n_images, len(ids)), replace=False))
    rows, captions = [], []
    for i in pick:
        img, gt = ds.load_image(ids[i]), ds.load_mask(ids[i])
        rows.append(
            [img, overlay_labels(img, gt)] + [overlay_labels(img, read_label_png(d / f"{ids[i]}.png")) for d in dirs]
        )
        captions.append(ids[i])
    gallery(rows, out_png, titles=["image", "ground truth", "seed", "CRF", "IRN"], row_labels=captions)


def irn_gallery(
    cfg: Mapping[str, Any],
    model_path: str,
    irn_markers: Sequence[str],
    out_png: str,
    n_images: int = 6,
    threads: int = 1,
) -> None:
    """Image | ground truth | IRN boundary map | IRN displacement field | IRN pseudo-mask for a few
    images of the evaluation split (the images :func:`mask_gallery` shows). ``cfg``: the
    ``irn_infer`` stage params (``irn.infer.pad_to`` pads the image as the mask jobs did); the
    masks are the PNGs the IRN mask shards wrote (``irn_markers``)."""
    import numpy as np

    from .io import read_label_png
    from .refine.irn import STRIDE, boundary_map, displacement_field, load_irn
    from .refine.irn_params import IRNInferParams
    from .viz import displacement_rgb, gallery, grey_rgb, overlay_labels, upsample_strided

    ds = open_dataset(cfg)
    mask_dir, _, skipped = read_shard_markers_full(irn_markers)
    ids = stored_ids(ds.ids(cfg["dataset"]["eval_split"]), skipped)
    pick = sorted(np.random.default_rng(0).choice(len(ids), size=min(n_images, len(ids)), replace=False))
    pad_to = IRNInferParams.from_mapping(cfg["irn"]["infer"]).pad_to
    device, _ = device_and_workers(threads)
    method = load_irn(model_path, device)
    rows, captions = [], []
    for i in pick:
        img, gt = ds.load_image(ids[i]), ds.load_mask(ids[i])
        size = img.shape[:2]
        edge = boundary_map(method, img, pad_to, device).cpu().numpy()
        disp = displacement_field(method, img, pad_to, device).cpu().numpy()
        rows.append(
            [
                img,
                overlay_labels(img, gt),
                grey_rgb(upsample_strided(edge, STRIDE, size)),
                displacement_rgb(np.stack([upsample_strided(c, STRIDE, size) for c in disp])),
                overlay_labels(img, read_label_png(mask_dir / f"{ids[i]}.png")),
            ]
        )
        captions.append(ids[i])
    gallery(
        rows,
        out_png,
        titles=["image", "ground truth", "IRN boundary", "IRN displacement", "IRN mask"],
        row_labels=captions,
    )


def launch_deeplab_training(
    cfg: Mapping[str, Any],
    mask_markers: Sequence[str],
    conf_markers: Sequence[str],
    model_out: str,
    work_dir: str,
    threads: int = 1,
    gpus: int = 0,
    log_out: Optional[str] = None,
) -> Path:
    """DeepLab training; with more than one GPU it re-launches itself under ``torchrun`` (one process
    per GPU, DDP in :mod:`wsss.engine`), otherwise it trains in this process. The step log is copied
    to ``log_out`` at the end."""
    import json
    import subprocess
    import sys

    if int(gpus or 0) <= 1 or "WORLD_SIZE" in os.environ:
        out = train_deeplab(cfg, mask_markers, conf_markers, model_out, work_dir, threads=threads)
        publish_train_log(work_dir, log_out)
        return out
    args = Path(work_dir) / "torchrun_args.json"
    args.parent.mkdir(parents=True, exist_ok=True)
    args.write_text(
        json.dumps(
            {
                "cfg": dict(cfg),
                "mask_markers": list(mask_markers),
                "conf_markers": list(conf_markers),
                "model_out": str(model_out),
                "work_dir": str(work_dir),
                "threads": int(threads),
            }
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={int(gpus)}",
        "-m",
        "wsss.pipeline",
        "deeplab-train",
        str(args),
    ]
    log.info("launching %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    publish_train_log(work_dir, log_out)
    return Path(model_out)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m wsss.pipeline deeplab-train ARGS.json``: the per-process entry under torchrun."""
    import json
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "deeplab-train":
        print("usage: python -m wsss.pipeline deeplab-train ARGS.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = json.loads(Path(argv[1]).read_text())
    train_deeplab(
        a["cfg"],
        a["mask_markers"],
        a["conf_markers"],
        a["model_out"],
        a["work_dir"],
        threads=a["threads"],
        progress=int(os.environ.get("RANK", "0")) == 0,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
