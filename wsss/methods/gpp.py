"""GPP: the Gated Pyramid Pooling classifier of AEFT (Yoon et al., ECCV 2022, §3.3; AEFT ``Net_gpp``).

The head on top of any backbone (ResNet-38 in the paper) is the official ``Net_gpp`` head:
``fc8`` 1x1 conv (backbone channels -> 256, no bias, Xavier-uniform) + ReLU, ``fc9`` 1x1 conv
(256 -> C, or C+1 for KTSE, no bias, Xavier-uniform). ``fc9``'s output ``f`` is the CAM. The GPP
layer replaces global average pooling:

* pyramid (Fig. 2): ``P_k = bilinear_up(adaptive_avg_pool(f, k x k), h x w)`` for k = 2, 4, 8, 16
  (``align_corners=False``);
* gated aggregation (Eq. 2-4), coarse to fine: ``P^_4 = G1(P_2, P_4)``, ``P^_8 = G2(P^_4, P_8)``,
  ``P^_16 = G3(P^_8, P_16)``. A gate ``G(x, y)`` has a positive and a negative 3x3 conv
  (2C -> 2 channels, shared by all classes, no bias) followed by a sigmoid;
  ``alpha = sig(conv_p([relu(x), relu(y)]))``, ``beta = sig(conv_n([relu(-x), relu(-y)]))`` and
  ``out = (relu(x) a_1 + relu(y) a_2)/2 - (relu(-x) b_1 + relu(-y) b_2)/2`` (sign-preserving);
* logits (Eq. 5): ``GAP(relu(f) relu(P^_16)) - GAP(relu(-f) relu(-P^_16))``.

Ablations of the paper's Table 1 are options: ``bins`` (one bin size: the pooled map itself is
the weight; an empty list gives the plain GAP baseline), ``aggregation`` (``gated`` = G,
coarse-to-fine; ``gated_inverse`` = G_I, fine-to-coarse; ``average`` = A).

The registered method ``gpp`` trains this classifier with the classification loss only (binary
cross-entropy on the GPP logits, Eq. 5 + L_cls of Eq. 11). ``aeft`` and ``ktse`` build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import METHODS, Method, StepContext

GPP_BINS = (2, 4, 8, 16)
AGGREGATIONS = ("gated", "gated_inverse", "average")


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------


def max_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per (image, class) normalisation of the official AEFT/KTSE code (docs/official_code.md):
    ``x = relu(x); relu(x - min - eps) / (max - min + eps)`` over the spatial dimensions."""
    x = F.relu(x)
    flat = x.flatten(2)
    mx = flat.max(dim=-1).values[..., None, None]
    mn = flat.min(dim=-1).values[..., None, None]
    return F.relu(x - mn - eps) / (mx - mn + eps)


def pyramid_pool(cam: torch.Tensor, bins: Sequence[int]) -> List[torch.Tensor]:
    """``P_k`` for each bin size ``k``: ``k x k`` adaptive average pooling, bilinearly upsampled
    (``align_corners=False``) back to the CAM's ``h x w`` (Fig. 2)."""
    size = cam.shape[-2:]
    return [F.interpolate(F.adaptive_avg_pool2d(cam, k), size=size, mode="bilinear", align_corners=False) for k in bins]


def gated_merge(x: torch.Tensor, y: torch.Tensor, weight_pos: torch.Tensor, weight_neg: torch.Tensor) -> torch.Tensor:
    """The sign-preserving gate ``G(x, y)`` of Eq. 2-4 with the given 3x3 conv weights (``2 x 2C x 3 x 3``).

    ``alpha = sigmoid(conv(cat(relu(x), relu(y)), weight_pos))``, ``beta = sigmoid(conv(cat(relu(-x),
    relu(-y)), weight_neg))`` (padding 1, no bias); returns
    ``(relu(x) alpha_1 + relu(y) alpha_2) / 2 - (relu(-x) beta_1 + relu(-y) beta_2) / 2``.
    """
    px, py, nx, ny = F.relu(x), F.relu(y), F.relu(-x), F.relu(-y)
    alpha = torch.sigmoid(F.conv2d(torch.cat([px, py], dim=1), weight_pos, padding=1))
    beta = torch.sigmoid(F.conv2d(torch.cat([nx, ny], dim=1), weight_neg, padding=1))
    pos = (px * alpha[:, 0:1] + py * alpha[:, 1:2]) / 2
    neg = (nx * beta[:, 0:1] + ny * beta[:, 1:2]) / 2
    return pos - neg


def gpp_logits(cam: torch.Tensor, gpp: torch.Tensor) -> torch.Tensor:
    """Eq. 5 (before the sigmoid): ``GAP(relu(cam) relu(gpp)) - GAP(relu(-cam) relu(-gpp))``, ``B x C``."""
    pos = (F.relu(cam) * F.relu(gpp)).mean(dim=(2, 3))
    neg = (F.relu(-cam) * F.relu(-gpp)).mean(dim=(2, 3))
    return pos - neg


def gap_embedding(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``GAP(relu(x)) * y`` (``B x C``): the image embedding of AEFT's attraction term and of KTSE's
    global alignment (the class feature extraction "CFE" keeps only the image's classes)."""
    return F.relu(x).mean(dim=(2, 3)) * labels


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------


class GatedConv(nn.Module):
    """One gate ``G`` (official ``gconv``): positive and negative 3x3 convs, 2C -> 2, no bias,
    PyTorch's default initialisation (the official code does not re-initialise them)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv_pos = nn.Conv2d(2 * num_classes, 2, 3, padding=1, bias=False)
        self.conv_neg = nn.Conv2d(2 * num_classes, 2, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return gated_merge(x, y, self.conv_pos.weight, self.conv_neg.weight)


@dataclass
class GPPOutput:
    """One forward pass: ``cam`` (``B x C x h x w`` foreground CAM ``f``), ``gpp`` (the aggregated
    pyramid ``P^_16``, ``None`` for the GAP baseline), ``logits`` (``B x C``) and ``cam_seg`` (the
    full ``fc9`` output; equals ``cam`` without a background channel, ``B x (C+1) x h x w`` with one)."""

    cam: torch.Tensor
    gpp: Optional[torch.Tensor]
    logits: torch.Tensor
    cam_seg: torch.Tensor


class GPPHead(nn.Module):
    """``fc8`` + ReLU + ``fc9`` and the GPP layer (module docstring). ``background=True`` adds a
    background channel in front (KTSE: ``fc9`` has C+1 outputs; GPP and logits use channels 1..C)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden_channels: int = 256,
        bins: Sequence[int] = GPP_BINS,
        aggregation: str = "gated",
        background: bool = False,
    ):
        super().__init__()
        bins = list(bins)
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in bins) or len(set(bins)) != len(bins):
            raise ValueError(f"bins must be distinct positive integers (paper: {list(GPP_BINS)}), got {bins!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        if not isinstance(hidden_channels, int) or hidden_channels < 1:
            raise ValueError(f"hidden_channels must be a positive integer, got {hidden_channels!r}")
        self.num_classes = num_classes
        self.background = bool(background)
        self.aggregation = aggregation
        # coarse-to-fine = increasing bin size; the inverse order for G_I
        self.bins = sorted(bins, reverse=aggregation == "gated_inverse")
        self.fc8 = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.fc9 = nn.Conv2d(hidden_channels, num_classes + int(self.background), 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        nn.init.xavier_uniform_(self.fc9.weight)
        n_gates = len(self.bins) - 1 if aggregation != "average" and len(self.bins) > 1 else 0
        self.gates = nn.ModuleList(GatedConv(num_classes) for _ in range(n_gates))

    def aggregate(self, cam: torch.Tensor) -> Optional[torch.Tensor]:
        """The GPP map ``P^`` of ``cam`` (``None`` when ``bins`` is empty: GAP baseline)."""
        if not self.bins:
            return None
        pyr = pyramid_pool(cam, self.bins)
        if len(pyr) == 1:
            return pyr[0]
        if self.aggregation == "average":
            return torch.stack(pyr).mean(dim=0)
        out = pyr[0]
        for gate, nxt in zip(self.gates, pyr[1:]):
            out = gate(out, nxt)
        return out

    def forward(self, feats: torch.Tensor) -> GPPOutput:
        cam_seg = self.fc9(F.relu(self.fc8(feats)))
        cam = cam_seg[:, 1:] if self.background else cam_seg
        gpp = self.aggregate(cam)
        logits = cam.mean(dim=(2, 3)) if gpp is None else gpp_logits(cam, gpp)
        return GPPOutput(cam=cam, gpp=gpp, logits=logits, cam_seg=cam_seg)


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------


@METHODS.register("gpp")
class GPPMethod(Method):
    """GPP classifier trained with the classification loss only (AEFT paper, Table 1 / "GPP only").

    Options: ``bins`` ([2, 4, 8, 16]), ``aggregation`` (``gated``), ``hidden_channels`` (256),
    ``head_lr_mult`` (1.0: the official ``Net_gpp`` puts every layer, heads included, in the x1
    group), ``cls_weight`` (1.0). See docs/methods/gpp.md.
    """

    name = "gpp"
    _background = False
    #: the official inference (AEFT ``infer_multi``) resizes the raw CAM to the image, ReLU after
    cam_upsample = "raw_then_relu"

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        bins: Sequence[int] = GPP_BINS,
        aggregation: str = "gated",
        hidden_channels: int = 256,
        head_lr_mult: float = 1.0,
        cls_weight: float = 1.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = GPPHead(
            backbone.out_channels,
            num_classes,
            hidden_channels=hidden_channels,
            bins=bins,
            aggregation=aggregation,
            background=self._background,
        )
        self.head_lr_mult = float(head_lr_mult)
        self.cls_weight = float(cls_weight)

    # -- interface -----------------------------------------------------------------------------
    def param_groups(self) -> List[Dict[str, Any]]:
        return [
            {"name": "backbone", "params": [p for p in self.backbone.parameters() if p.requires_grad], "lr_mult": 1.0},
            {"name": "head", "params": list(self.head.parameters()), "lr_mult": self.head_lr_mult},
        ]

    def forward_all(self, images: torch.Tensor) -> GPPOutput:
        """Backbone + head: CAM, GPP map, logits (and the full ``fc9`` output)."""
        return self.head(self.backbone(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_all(images).logits

    def cam(self, images: torch.Tensor) -> torch.Tensor:
        """ReLU'd foreground CAM ``fc9`` at feature resolution: what the official ``infer_multi``
        fuses (the CAM, not the GPP map; AEFT ``infer.py``)."""
        return F.relu(self.forward_all(images).cam)

    def raw_cam(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`cam` before the ReLU (``cam.upsample: raw_then_relu``)."""
        return self.forward_all(images).cam

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy with logits, mean over ``B x C`` (= multilabel soft margin, KTSE Eq. 2)."""
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        out = self.forward_all(batch["image"])
        return {"cls": self.cls_weight * self.classification_loss(out.logits, batch["label"])}


__all__ = [
    "AGGREGATIONS",
    "GPP_BINS",
    "GPPHead",
    "GPPMethod",
    "GPPOutput",
    "GatedConv",
    "gap_embedding",
    "gated_merge",
    "gpp_logits",
    "max_norm",
    "pyramid_pool",
]
