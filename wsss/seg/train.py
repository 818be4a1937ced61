"""The segmentation network as a :class:`wsss.methods.base.Method`, trained by :func:`wsss.engine.train`.

Plain DeepLab training on pseudo-masks (the stage KTSE/BECO's co-training replaces with two
networks; see docs/deeplab.md):

* ``losses()`` = ``{"ce": per-pixel cross-entropy, ignore_index 255}``. ``ce_normalisation``:
  ``"valid"`` averages over the non-ignored pixels (PyTorch's ``reduction="mean"``);
  ``"all"`` divides the summed loss by *all* pixels of the batch, as BECO's
  ``mean(CE(reduction="none") * m)`` does (ignored and unconfident pixels count in the
  denominator with loss 0). A batch without any valid pixel gives a zero loss (not NaN).
* ``param_groups()``: backbone at ``lr x 1``, new head at ``lr x head_lr_mult``. BECO uses one lr for
  all parameters (``head_lr_mult = 1``, ``runners/optimizer.py``); the original DeepLab-v2 recipe
  uses 10.
* Optimiser: SGD with real momentum 0.9 (engine ``momentum_mode="standard"``), poly power 0.9.

This method is *not* registered in :data:`wsss.methods.base.METHODS` (that registry holds the
image-level classifier methods).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import TrainConfig
from ..methods.base import Method, StepContext
from .models import SegModel, build_seg_model
from .params import CE_NORMALISATIONS, PARAM_GROUPS

IGNORE_INDEX = 255


def segmentation_ce(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX, normalisation: str = "valid"
) -> torch.Tensor:
    """Cross-entropy of ``B x C x H x W`` logits against ``B x H x W`` targets (see module docstring)."""
    if normalisation not in CE_NORMALISATIONS:
        raise ValueError(f"ce_normalisation must be one of {CE_NORMALISATIONS}, got {normalisation!r}")
    if logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in size")
    per_pixel = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
    if normalisation == "all":
        return per_pixel.sum() / per_pixel.numel()
    valid = (target != ignore_index).sum()
    return per_pixel.sum() / valid.clamp(min=1)


def nearest_resize_labels(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``B x H x W`` labels resized to ``size`` by nearest neighbour exactly as PIL's
    ``Image.resize(..., NEAREST)`` (deeplab-pytorch ``resize_labels``): output pixel ``i`` takes
    input ``int(x_i)`` where PIL accumulates ``x_0 = 0.5 * in / out``, ``x_{i+1} = x_i + in / out``
    in double precision (so ``(i + 0.5) * in / out`` landing on an integer may round down)."""

    def index(n_in: int, n_out: int) -> torch.Tensor:
        step = n_in / n_out
        xs = np.cumsum(np.concatenate([[0.5 * step], np.full(n_out - 1, step)]))
        return torch.from_numpy(np.minimum(xs.astype(np.int64), n_in - 1)).to(mask.device)

    (h, w), (oh, ow) = mask.shape[-2:], size
    return mask[:, index(h, oh)][:, :, index(w, ow)].long()


class SegmentationMethod(Method):
    """A :class:`SegModel` trained with cross-entropy on (pseudo-)masks."""

    name = "deeplab"

    def __init__(
        self,
        model: SegModel,
        head_lr_mult: float = 1.0,
        ce_normalisation: str = "all",
        ignore_index: int = IGNORE_INDEX,
        param_groups: str = "standard",
        train_scales: Sequence[float] = (),
    ):
        super().__init__()
        if ce_normalisation not in CE_NORMALISATIONS:
            raise ValueError(f"ce_normalisation must be one of {CE_NORMALISATIONS}, got {ce_normalisation!r}")
        if param_groups not in PARAM_GROUPS:
            raise ValueError(f"param_groups must be one of {PARAM_GROUPS}, got {param_groups!r}")
        if any(not 0 < float(p) for p in train_scales):
            raise ValueError(f"train_scales must be positive factors, got {list(train_scales)!r}")
        self.model = model
        self.group_style = param_groups
        self.train_scales = tuple(float(p) for p in train_scales)
        self.head_lr_mult = float(head_lr_mult)
        self.ce_normalisation = ce_normalisation
        self.ignore_index = int(ignore_index)

    @property
    def backbone(self):
        return self.model.backbone

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def align_corners(self) -> bool:
        """The network's upsampling convention (read by :func:`wsss.seg.evaluate.predict_probs`)."""
        return bool(self.model.align_corners)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.model(images)

    def param_groups(self) -> List[Dict[str, Any]]:
        head_ids = {id(p) for m in self.model.head_modules() for p in m.parameters()}
        if self.group_style == "seam":
            return self._seam_groups(head_ids)
        head = [p for p in self.model.parameters() if id(p) in head_ids and p.requires_grad]
        rest = [p for p in self.model.parameters() if id(p) not in head_ids and p.requires_grad]
        return [
            {"name": "backbone", "params": rest, "lr_mult": 1.0},
            {"name": "head", "params": head, "lr_mult": self.head_lr_mult},
        ]

    def _seam_groups(self, head_ids: set) -> List[Dict[str, Any]]:
        """SEAM's ``get_parameter_groups`` (YudeWang/SEAM, arvijj/hfpl ``lib/net/deeplabv1.py`` with
        ``train_final_voc.py``): only convolutions are optimised, weights at lr x 1 (head x
        ``head_lr_mult``), biases at twice that without weight decay; BatchNorm weights and biases
        stay at their initial values (the layers still normalise with batch statistics)."""
        groups = {k: [] for k in ("backbone", "backbone_bias", "head", "head_bias")}
        for m in self.model.modules():
            if not isinstance(m, torch.nn.Conv2d):
                continue
            for p, bias in ((m.weight, False), (m.bias, True)):
                if p is None or not p.requires_grad:
                    continue
                groups[("head" if id(p) in head_ids else "backbone") + ("_bias" if bias else "")].append(p)
        h = self.head_lr_mult
        mult = {"backbone": 1.0, "backbone_bias": 2.0, "head": h, "head_bias": 2.0 * h}
        return [
            {"name": k, "params": v, "lr_mult": mult[k], **({"weight_decay": 0.0} if k.endswith("_bias") else {})}
            for k, v in groups.items()
            if v
        ]

    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        if self.train_scales:
            return self._msc_losses(batch["image"], batch["mask"])
        logits = self.model(batch["image"])["out"]
        return {"ce": segmentation_ce(logits, batch["mask"], self.ignore_index, self.ce_normalisation)}

    def _msc_losses(self, x: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """deeplab-pytorch's multi-scale training (kazuto1011/deeplab-pytorch ``libs/models/msc.py``,
        ``main.py``): the network's own-resolution logits of the crop and of the crop rescaled by
        each of ``train_scales`` (bilinear), and their pixel-wise maximum after resizing to the
        first; each scored against the mask resized to its size (nearest, as PIL does); the terms
        ``ce``, ``ce_scale<percent>`` and ``ce_max`` are summed by the engine."""
        base = self.model.pre_logits(x)
        size = tuple(base.shape[-2:])
        outs = {"ce": base}
        for p in self.train_scales:
            scaled = F.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False)
            outs[f"ce_scale{round(p * 100)}"] = self.model.pre_logits(scaled)
        resized = [
            v if tuple(v.shape[-2:]) == size else F.interpolate(v, size=size, mode="bilinear", align_corners=False)
            for v in outs.values()
        ]
        outs["ce_max"] = torch.stack(resized).max(0).values
        terms = {}
        for name, logits in outs.items():
            target = nearest_resize_labels(mask, tuple(logits.shape[-2:]))
            terms[name] = segmentation_ce(logits, target, self.ignore_index, self.ce_normalisation)
        return terms


def build_seg_method(params: Mapping[str, Any], num_classes: int, pretrained: str | None = None) -> SegmentationMethod:
    """The configured network wrapped as a method (``pretrained`` overrides ``params``, e.g. 'none'
    when weights are loaded from a trained model file)."""
    model = build_seg_model(
        params["model"],
        num_classes,
        backbone=params["backbone"],
        pretrained=pretrained or params["pretrained"],
        freeze_bn=bool(params["freeze_bn"]),
        **dict(params["model_options"]),
    )
    return SegmentationMethod(
        model,
        head_lr_mult=params["head_lr_mult"],
        ce_normalisation=params["ce_normalisation"],
        param_groups=params["param_groups"],
        train_scales=params["train_scales"],
    )


def seg_train_config(params: Mapping[str, Any]) -> TrainConfig:
    """Engine settings of the stage: SGD with real momentum (``"standard"``) or AdamW
    (``optimizer``), poly schedule."""
    return TrainConfig(
        epochs=int(params["epochs"]),
        batch_size=int(params["batch_size"]),
        optimizer=str(params["optimizer"]),
        lr=float(params["lr"]),
        weight_decay=float(params["weight_decay"]),
        momentum_mode="standard",
        momentum=float(params["momentum"]),
        poly_power=float(params["poly_power"]),
        amp=bool(params["amp"]),
        seed=int(params["seed"]),
        drop_last=True,
    )
