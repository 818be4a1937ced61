"""Baseline CAM (Zhou et al. 2016) in the IRN recipe (``net/resnet50_cam.py``, ``step/train_cam.py``).

Backbone features -> global average pooling -> bias-free 1x1 classifier -> multilabel soft-margin
loss. The CAM is the classifier applied at every position (no pooling), ReLU'd.
Parameter groups as IRN: backbone at the base lr, classifier at ``head_lr_mult`` x base (10).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .base import METHODS, Method, StepContext


@METHODS.register("cam")
class CAMMethod(Method):
    name = "cam"

    def __init__(self, num_classes: int, backbone: nn.Module, head_lr_mult: float = 10.0, cls_weight: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        self.head_lr_mult = head_lr_mult
        self.cls_weight = cls_weight

    def param_groups(self) -> List[Dict[str, Any]]:
        return [
            {"name": "backbone", "params": [p for p in self.backbone.parameters() if p.requires_grad], "lr_mult": 1.0},
            {"name": "head", "params": list(self.classifier.parameters()), "lr_mult": self.head_lr_mult},
        ]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images)
        pooled = F.adaptive_avg_pool2d(feats, 1)
        return self.classifier(pooled).flatten(1)

    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        logits = self.logits(batch["image"])
        return {"cls": self.cls_weight * F.multilabel_soft_margin_loss(logits, batch["label"])}

    def cam(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.classifier(self.backbone(images)))

    def raw_cam(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images))

    # -- ISL/FSL add-on protocol (wsss.methods.islfsl, docs/methods/islfsl.md) ------------------
    #: the loss term that is the GAP classification loss (ISL mixes with it)
    islfsl_cls_term = "cls"

    def features_and_cams(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One forward pass: backbone ``features``, raw (pre-ReLU) ``cams`` = the classifier at every
        position, and ``logits`` = their GAP (equal to :meth:`logits`: the classifier is linear)."""
        feats = self.backbone(images)
        cams = self.classifier(feats)
        return {"features": feats, "cams": cams, "logits": cams.mean(dim=(2, 3))}

    def losses_from_outputs(
        self, batch: Dict[str, Any], ctx: StepContext, outputs: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """:meth:`losses` computed from :meth:`features_and_cams` outputs of ``batch["image"]``."""
        return {"cls": self.cls_weight * F.multilabel_soft_margin_loss(outputs["logits"], batch["label"])}
