"""EPS: Explicit Pseudo-pixel Supervision (Lee, Lee, Lee, Shim, CVPR 2021, *Railroad is not a Train:
Saliency as Pseudo-pixel Supervision for Weakly Supervised Semantic Segmentation*; official code
``halbielee/EPS``: ``network/resnet38_eps.py``, ``eps.py::get_eps_loss``, ``module/train.py::train_eps``,
``infer.py``). Options, equations and code/paper switches: docs/methods/eps.md.

Network: a backbone and a bias-free 1x1 classifier with ``C + 1`` outputs, the **background last**
(channel ``C``, as the official code); the logits are the GAP of all ``C + 1`` maps. With
``projection_channels > 0`` the head is the modified EPS of SMAF (Yang et al., ICME 2023; official
code ``bupt-ai-cz/SMAF``, ``models/EPS.py``): a bias-free 1x1 projection to 128 channels, a frozen
BatchNorm and a ReLU before the classifier.

Per step, for images ``x``, labels ``y`` and saliency maps ``S`` (``batch["saliency"]``, ``B x 1 x
H x W`` in [0, 1], the crop of the off-the-shelf saliency map):

* ``cls`` = multilabel soft margin of the ``C`` foreground logits (the background logit has no
  image-level target);
* ``sal`` (:func:`eps_saliency_loss`): ``P = softmax(cam)`` over the ``C + 1`` channels; ``S`` resized
  (nearest) to the CAM size; a present class ``c`` is *foreground* if the overlap
  ``|round(P_c) round(S)| / |round(P_c)|`` exceeds ``tau`` (0.4), otherwise its map joins the
  background; ``S_hat = lam * sum_fg P_c + (1 - lam) * (1 - P_bg - sum_{present, not fg} P_c)``
  (``lam`` = 0.5) and ``L_sal = mean (S_hat - S)^2``.

CAM inference (``infer.py``): the foreground channels of ``softmax(cam)`` at feature resolution,
resized bilinearly to the image, summed over scales and flips and divided by their maximum; so
:meth:`EPSMethod.cam` returns ``softmax(cam)[:, :C]`` (non-negative already, no ReLU) and
``cam_upsample`` is ``raw_then_relu`` (views resized straight to the image size; the ReLU after it is a
no-op on softmax maps).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import METHODS, Method, StepContext

#: official values (``script/voc12_eps.sh``: ``--tau 0.4``; ``main.py``: ``--lam 0.5``)
TAU = 0.4
LAM = 0.5


def eps_saliency_estimate(
    cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float = TAU, lam: float = LAM
) -> Tuple[torch.Tensor, torch.Tensor]:
    """EPS's saliency estimate from the ``B x (C+1) x h x w`` raw CAM (background last) and the
    saliency map already at ``h x w`` (``B x 1 x h x w``): returns ``(S_hat, fg_valid)`` with
    ``S_hat`` ``B x 1 x h x w`` and ``fg_valid`` the ``B x C`` boolean "present and overlap > tau".

    The overlap of class ``c`` is ``sum(round(P_c) round(S)) / sum(round(P_c) + 1e-4)`` (the
    ``1e-4`` added per pixel, as the official code), computed without gradient."""
    c = cam.shape[1] - 1
    prob = F.softmax(cam.float(), dim=1)
    fg_prob, bg_prob = prob[:, :c], prob[:, c:]
    with torch.no_grad():
        r = torch.round(fg_prob)
        overlap = (r * torch.round(saliency.float())).flatten(2).sum(-1) / (r + 1e-4).flatten(2).sum(-1)
        present = labels > 0.5
        fg_valid = present & (overlap > float(tau))
        to_bg = present & ~fg_valid
    fg_map = (fg_prob * fg_valid[:, :, None, None].to(prob.dtype)).sum(dim=1, keepdim=True)
    bg_map = bg_prob + (fg_prob * to_bg[:, :, None, None].to(prob.dtype)).sum(dim=1, keepdim=True)
    return float(lam) * fg_map + (1.0 - float(lam)) * (1.0 - bg_map), fg_valid


def eps_saliency_loss(
    cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float = TAU, lam: float = LAM
) -> torch.Tensor:
    """``L_sal`` (EPS Eq. 3-4, ``get_eps_loss``): the saliency map ``B x 1 x H x W`` is resized
    (nearest) to the CAM size, ``S_hat`` is :func:`eps_saliency_estimate`, the loss is
    ``mean (S_hat - S)^2``."""
    sal = F.interpolate(saliency.float(), size=cam.shape[-2:], mode="nearest")
    estimate, _ = eps_saliency_estimate(cam, sal, labels, tau, lam)
    return F.mse_loss(estimate, sal)


@METHODS.register("eps")
class EPSMethod(Method):
    """EPS (module docstring); options and defaults in docs/methods/eps.md."""

    name = "eps"
    #: batches must carry ``saliency`` (the classification dataset loads it; the workflow makes the
    #: saliency maps an input of the training job)
    needs_saliency = True
    #: softmax CAMs resized straight to the image size, as the official ``infer.py``
    cam_upsample = "raw_then_relu"

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        head_lr_mult: float = 10.0,
        cls_weight: float = 1.0,
        sal_weight: float = 1.0,
        tau: float = TAU,
        lam: float = LAM,
        projection_channels: int = 0,
    ):
        super().__init__()
        if not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"eps lam must lie in [0, 1], got {lam!r}")
        if not 0.0 <= float(tau) <= 1.0:
            raise ValueError(f"eps tau must lie in [0, 1], got {tau!r}")
        if isinstance(projection_channels, bool) or int(projection_channels) < 0:
            raise ValueError(f"eps projection_channels must be a non-negative integer, got {projection_channels!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head_lr_mult = float(head_lr_mult)
        self.cls_weight, self.sal_weight = float(cls_weight), float(sal_weight)
        self.tau, self.lam = float(tau), float(lam)
        self.projection_channels = int(projection_channels)
        if self.projection_channels:
            self.projection = nn.Conv2d(backbone.out_channels, self.projection_channels, 1, bias=False)
            self.projection_bn = nn.BatchNorm2d(self.projection_channels)
            self.projection_bn.requires_grad_(False)  # SMAF's train() freezes every BatchNorm
            self.projection_bn.eval()
            nn.init.xavier_uniform_(self.projection.weight)
            width = self.projection_channels
        else:
            self.projection, self.projection_bn = None, None
            width = backbone.out_channels
        self.classifier = nn.Conv2d(width, num_classes + 1, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)

    #: index of the background channel of :meth:`full_cam` (SMAF's ``student_loss: softmax_bg``)
    @property
    def background_channel(self) -> int:
        return self.num_classes

    def train(self, mode: bool = True) -> "EPSMethod":
        super().train(mode)
        if self.projection_bn is not None:
            self.projection_bn.eval()
        return self

    def param_groups(self) -> List[Dict[str, Any]]:
        head = list(self.classifier.parameters())
        if self.projection is not None:
            head += list(self.projection.parameters())
        return [
            {"name": "backbone", "params": [p for p in self.backbone.parameters() if p.requires_grad], "lr_mult": 1.0},
            {"name": "head", "params": head, "lr_mult": self.head_lr_mult},
        ]

    def full_cam(self, images: torch.Tensor) -> torch.Tensor:
        """The raw ``B x (C+1) x h x w`` map, background last (``forward_cam`` of the official code)."""
        x = self.backbone(images)
        if self.projection is not None:
            x = F.relu(self.projection_bn(self.projection(x)))
        return self.classifier(x)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The ``C`` foreground logits (GAP of the maps; the background logit is dropped)."""
        return self.full_cam(images).mean(dim=(2, 3))[:, : self.num_classes]

    def cam(self, images: torch.Tensor) -> torch.Tensor:
        """Foreground channels of ``softmax(full_cam)`` (official ``infer.py``), ``B x C x h x w``."""
        return F.softmax(self.full_cam(images).float(), dim=1)[:, : self.num_classes]

    def raw_cam(self, images: torch.Tensor) -> torch.Tensor:
        """The same softmax maps: they are what the official code resizes; the ReLU that
        ``cam.upsample: raw_then_relu`` applies after resizing leaves them unchanged."""
        return self.cam(images)

    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        if "saliency" not in batch:
            raise KeyError("method eps needs saliency maps: the batch has no 'saliency' (see docs/methods/eps.md)")
        cam = self.full_cam(batch["image"])
        labels = batch["label"].float()
        with torch.autocast(device_type=cam.device.type, enabled=False):
            logits = cam.float().mean(dim=(2, 3))[:, : self.num_classes]
            terms = {"cls": self.cls_weight * F.multilabel_soft_margin_loss(logits, labels)}
            terms["sal"] = self.sal_weight * eps_saliency_loss(cam, batch["saliency"], labels, self.tau, self.lam)
        return terms


__all__ = ["EPSMethod", "LAM", "TAU", "eps_saliency_estimate", "eps_saliency_loss"]
