"""Pretraining a backbone on formula-driven images (:mod:`wsss.pretrain.procedural`).

The stand-in for ImageNet weights where none can be downloaded: the backbone learns to name the
formula-defined shape and texture families (``pretrain.num_shapes``, ``pretrain.num_textures``) in
multi-label images, with the baseline CAM head (global average pooling, 1x1 classifier,
multilabel soft-margin loss; :class:`wsss.methods.cam.CAMMethod`) and the one training engine
(:mod:`wsss.engine`: poly SGD, a checkpoint per epoch, resume, a per-step loss log). Every epoch
renders ``images_per_epoch`` new images (image index ``epoch * images_per_epoch + i``), so the
network never sees an image twice. The model file holds the whole classifier; a stage with
``pretrained: procedural`` loads its ``backbone.*`` tensors (:func:`wsss.models.load_pretrained`
strips the prefix) and ignores the head.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.classification import sample_rng
from ..data.transforms import normalize
from .procedural import GENERATOR_VERSION, make_categories, render_image

log = logging.getLogger(__name__)

#: Keys of the ``pretrain`` config section that the pretrained weights depend on.
TRAIN_KEYS = (
    "epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum_mode", "momentum", "poly_power", "amp", "seed",
)  # fmt: skip


class ProceduralSet(Dataset):
    """``images_per_epoch`` formula-driven images per epoch, new ones every epoch (call
    :meth:`set_epoch`); samples as the classifier's training set: ``image`` (normalised CHW
    float32, randomly flipped) and multi-hot ``label``."""

    def __init__(
        self,
        images_per_epoch: int,
        image_size: int,
        num_shapes: int,
        num_textures: int,
        seed: int,
        max_objects: int = 3,
    ):
        self.n, self.size, self.seed, self.max_objects = images_per_epoch, image_size, seed, max_objects
        self.categories = make_categories(num_shapes, num_textures, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Dict[str, Any]:
        img, cats = render_image(self.epoch * self.n + index, self.seed, self.categories, self.size, self.max_objects)
        if sample_rng(self.seed, self.epoch, index).random() < 0.5:
            img = img[:, ::-1]
        label = np.zeros(self.categories.num_labels, dtype=np.float32)
        label[cats] = 1.0
        x = np.ascontiguousarray(normalize(img).transpose(2, 0, 1))
        return {"image": torch.from_numpy(x), "label": torch.from_numpy(label), "index": index}


def pretrain(
    params: Mapping[str, Any],
    model_out: str,
    work_dir: str,
    threads: int = 1,
    progress: bool = True,
    log_out: Optional[str] = None,
) -> Path:
    """Pretrain ``params["backbone"]`` (the ``pretrain`` config section plus ``backbone``) and
    write the model file; resumes from ``work_dir/last.pt`` of the same config (one of another
    config is set aside). ``log_out``: where to copy the step log when training is done."""
    import torch

    from ..engine import train, train_config_from
    from ..methods.cam import CAMMethod
    from ..models import build_backbone
    from ..pipeline import publish_train_log
    from ..workflow.jobs import device_and_workers, set_aside_stale_checkpoint

    resolved = {**dict(params), "generator_version": GENERATOR_VERSION}
    set_aside_stale_checkpoint(Path(work_dir) / "last.pt", resolved)
    device, workers = device_and_workers(threads)
    torch.manual_seed(params["seed"])
    backbone = build_backbone(params["backbone"], pretrained="none", freeze_bn=False, trainable_from=None)
    data = ProceduralSet(
        params["images_per_epoch"],
        params["image_size"],
        params["num_shapes"],
        params["num_textures"],
        params["seed"],
        params["max_objects"],
    )
    method = CAMMethod(data.categories.num_labels, backbone, head_lr_mult=1.0)
    cfg = train_config_from({k: params[k] for k in TRAIN_KEYS})
    log.info(
        "pretraining %s on %d shape and %d texture families: %d epochs x %d images of %d px, device %s, %d workers",
        params["backbone"],
        params["num_shapes"],
        params["num_textures"],
        cfg.epochs,
        params["images_per_epoch"],
        params["image_size"],
        device,
        workers,
    )
    out = train(
        method,
        data,
        cfg,
        Path(model_out),
        Path(work_dir),
        resolved_config=resolved,
        device=device,
        num_workers=workers,
        progress=progress,
    )
    publish_train_log(work_dir, log_out)
    return out
