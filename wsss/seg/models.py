"""Segmentation networks of the fully supervised stage (trained on pseudo-masks).

Three networks, registered in :data:`SEG_MODELS` and built with :func:`build_seg_model`:

* ``deeplabv2`` - the DeepLab-v2 network of the KTSE/BECO segmentation stage
  (``KTSE:segmentation/networks/deeplabv2.py``): a dilated ResNet with output stride 8 (default
  ``resnet101_os8``, any backbone with output stride 8 works, e.g. ``resnet18_os8`` for CPU runs)
  and the DeepLab-v2 ASPP head: four parallel 3x3 convolutions ``C_in -> num_classes`` with dilation
  = padding = 6, 12, 18, 24, with bias, weights ~ N(0, 0.01), bias 0, whose outputs are **summed**.
  No BN, no dropout, no image pooling in the head. The stride-8 logits are upsampled bilinearly
  (``align_corners=False``) to the input size.
* ``deeplabv3plus`` - DeepLab-v3+ (Chen et al., ECCV 2018), built on our backbones' taps (not
  torchvision's head): DeepLab-v3 ASPP on the final feature map (1x1 branch, three 3x3 atrous
  branches, image pooling; 256 channels, BN + ReLU; rates 6/12/18 at output stride 16, doubled
  at output stride 8 as in the paper), 1x1 projection (BN, ReLU, dropout), then the decoder: the
  stride-4 tap reduced to 48 channels (1x1 conv, BN, ReLU), the ASPP output upsampled to it,
  concatenated, two 3x3 convs with 256 channels (BN, ReLU) and a 1x1 classifier; logits
  upsampled to the input size. Deviation: the image-pooling branch has no BN (a 1x1 map has a
  single value per channel, so BN in training mode fails for batch 1 and is a per-batch constant
  otherwise); its 1x1 conv has a bias instead.

* ``deeplabv1`` - the "DeepLab-LargeFOV" (DeepLab-v1) network of SEAM's segmentation stage as HFPL
  runs it (``arvijj/hfpl``: ``lib/net/deeplabv1.py``, ``voc12/config_voc2012.py``; the same code
  base as ``YudeWang/SEAM``), which AEFT and ACR also name for their ResNet-38 segmentation: a
  backbone of output stride 8 (default ``resnet38``) and the head ``conv 3x3, dilation = padding
  = 12, C_in -> 512`` (no bias) + BN + ReLU, ``conv 1x1 512 -> 512`` (no bias) + BN + ReLU,
  dropout 0.5, ``conv 1x1 512 -> num_classes`` (with bias); head convs Kaiming-normal (fan_out),
  BN weight 1 / bias 0. The logits are upsampled bilinearly with ``align_corners=True`` (SEAM).

All return ``{"out": logits}`` (``B x num_classes x H x W``, the input size), like torchvision's
segmentation models. ImageNet initialisation goes through the classifier's ``pretrained`` options
(``'imagenet'``, ``'imagenet_v2'`` = the ``resnet101-cd907fc2.pth`` file BECO uses, ``'none'``, or a
path). BN: BECO trains plain (unsynchronised) BatchNorm, so ``freeze_bn`` defaults to False; set it
True to keep the ImageNet statistics (small batches). Every backbone stage trains
(``trainable_from=None``), as in BECO.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_backbone
from ..models.backbones import Backbone
from ..registry import Registry

log = logging.getLogger(__name__)

SEG_MODELS = Registry("segmentation model")

#: DeepLab-v2 ASPP rates (``KTSE:segmentation/networks/deeplabv2.py``, ``ASPP``).
DEEPLABV2_RATES = (6, 12, 18, 24)
#: DeepLab-v3/v3+ ASPP rates at output stride 16 (doubled at output stride 8).
DEEPLABV3_RATES_OS16 = (6, 12, 18)


class SegModel(nn.Module):
    """Backbone + head. ``forward(x) -> {"out": logits at the input size}``.

    ``head_modules()`` lists the newly initialised layers (they may get a larger learning rate);
    everything else belongs to the (ImageNet-initialised) backbone.
    """

    name: str = "base"

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
        self.backbone = backbone
        self.num_classes = int(num_classes)

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def head_modules(self) -> List[nn.Module]:
        raise NotImplementedError

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the network's own resolution (before the final upsampling)."""
        raise NotImplementedError

    #: ``align_corners`` of the final upsampling (False: BECO/torchvision; True: SEAM's DeepLab-v1).
    align_corners: bool = False

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.pre_logits(x)
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)}


# ----------------------------------------------------------------------------------------------
# DeepLab-v2
# ----------------------------------------------------------------------------------------------


class ASPPv2(nn.Module):
    """DeepLab-v2 ASPP: parallel dilated 3x3 convs straight to the classes, outputs summed."""

    def __init__(
        self, in_channels: int, num_classes: int, rates: Sequence[int] = DEEPLABV2_RATES, init_std: float = 0.01
    ):
        super().__init__()
        if not rates:
            raise ValueError("ASPP needs at least one rate")
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in self.rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=init_std)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(SegModel):
    name = "deeplabv2"

    def __init__(
        self, backbone: Backbone, num_classes: int, rates: Sequence[int] = DEEPLABV2_RATES, init_std: float = 0.01
    ):
        super().__init__(backbone, num_classes)
        self.head = ASPPv2(backbone.out_channels, num_classes, rates, init_std)

    def head_modules(self) -> List[nn.Module]:
        return [self.head]

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# ----------------------------------------------------------------------------------------------
# DeepLab-v1 (LargeFOV), SEAM's variant
# ----------------------------------------------------------------------------------------------

#: SEAM / HFPL DeepLab-v1 head: field-of-view conv dilation and width.
DEEPLABV1_DILATION = 12
DEEPLABV1_CHANNELS = 512


class DeepLabV1(SegModel):
    """Backbone + SEAM's LargeFOV head (3x3 dilated conv, 1x1 conv, each with BN + ReLU, dropout,
    1x1 classifier)."""

    name = "deeplabv1"
    align_corners = True

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        channels: int = DEEPLABV1_CHANNELS,
        dilation: int = DEEPLABV1_DILATION,
        dropout: float = 0.5,
    ):
        super().__init__(backbone, num_classes)
        if int(channels) < 1 or int(dilation) < 1 or not 0 <= float(dropout) < 1:
            raise ValueError(
                f"deeplabv1: channels and dilation must be >= 1 and dropout in [0, 1), "
                f"got channels={channels!r}, dilation={dilation!r}, dropout={dropout!r}"
            )
        self.dilation = int(dilation)
        self.head = nn.Sequential(
            _conv_bn_relu(backbone.out_channels, int(channels), 3, self.dilation),
            _conv_bn_relu(int(channels), int(channels), 1),
            nn.Dropout(float(dropout)),
            nn.Conv2d(int(channels), num_classes, 1, bias=True),
        )
        init_head(self.head_modules())

    def head_modules(self) -> List[nn.Module]:
        return [self.head]

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# ----------------------------------------------------------------------------------------------
# DeepLab-v3+
# ----------------------------------------------------------------------------------------------


def init_head(modules: Sequence[nn.Module]) -> None:
    """Kaiming (fan-out) convolutions with zero bias and unit BatchNorm in every module of
    ``modules`` (the heads of DeepLab-v1 and DeepLab-v3+)."""
    for m in modules:
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPPv3(nn.Module):
    """DeepLab-v3 ASPP: 1x1 branch, atrous 3x3 branches, image pooling; concat + 1x1 projection."""

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int], dropout: float):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, channels, 1)])
        self.branches.extend(_conv_bn_relu(in_channels, channels, 3, int(r)) for r in rates)
        # image pooling: no BN (see module docstring)
        self.pool_conv = nn.Conv2d(in_channels, channels, 1, bias=True)
        self.project = nn.Sequential(
            _conv_bn_relu(channels * (len(self.branches) + 1), channels, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        pooled = F.relu(self.pool_conv(F.adaptive_avg_pool2d(x, 1)))
        outs.append(pooled.expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Plus(SegModel):
    name = "deeplabv3plus"

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        rates: Optional[Sequence[int]] = None,
        aspp_channels: int = 256,
        low_level_tap: Optional[str] = None,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__(backbone, num_classes)
        self.low_level_tap = low_level_tap or _stride4_tap(backbone)
        if self.low_level_tap not in backbone.tap_channels or self.low_level_tap == "out":
            raise ValueError(
                f"deeplabv3plus: backbone {type(backbone).__name__} has no tap {self.low_level_tap!r}; "
                f"taps: {sorted(k for k in backbone.tap_channels if k != 'out')}"
            )
        if rates is None:
            if backbone.output_stride not in (8, 16):
                raise ValueError(
                    f"deeplabv3plus: no default ASPP rates for output stride {backbone.output_stride}; give model_options.rates"
                )
            rates = tuple(r * 16 // backbone.output_stride for r in DEEPLABV3_RATES_OS16)
        self.rates = tuple(int(r) for r in rates)
        self.aspp = ASPPv3(backbone.out_channels, aspp_channels, self.rates, dropout)
        self.reduce = _conv_bn_relu(backbone.tap_channels[self.low_level_tap], low_level_channels, 1)
        self.decoder = nn.Sequential(
            _conv_bn_relu(aspp_channels + low_level_channels, decoder_channels, 3),
            _conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        init_head(self.head_modules())

    def head_modules(self) -> List[nn.Module]:
        return [self.aspp, self.reduce, self.decoder, self.classifier]

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.backbone.forward_dict(x)
        low = self.reduce(taps[self.low_level_tap])
        high = F.interpolate(self.aspp(taps["out"]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.decoder(torch.cat([high, low], dim=1)))


def _stride4_tap(backbone: Backbone) -> str:
    for name, stride in backbone.tap_strides.items():
        if stride == 4 and name != "out":
            return name
    raise ValueError(
        f"deeplabv3plus needs a stride-4 feature tap; backbone {type(backbone).__name__} has taps "
        f"{dict(backbone.tap_strides)} (use a ResNet backbone, or give model_options.low_level_tap)"
    )


# ----------------------------------------------------------------------------------------------
# registry and factory
# ----------------------------------------------------------------------------------------------


def _backbone(name: str, pretrained: Optional[str], freeze_bn: bool) -> Backbone:
    return build_backbone(name, pretrained=pretrained or "none", freeze_bn=freeze_bn, trainable_from=None)


def _os8_backbone(model: str, name: str, pretrained: Optional[str], freeze_bn: bool, examples: str) -> Backbone:
    """:func:`_backbone`, refused (naming ``model`` and ``examples``) unless its output stride is 8."""
    bb = _backbone(name, pretrained, freeze_bn)
    if bb.output_stride != 8:
        raise ValueError(
            f"{model} needs an output-stride-8 backbone (e.g. {examples}); {name!r} has output stride {bb.output_stride}"
        )
    return bb


@SEG_MODELS.register("deeplabv2")
def deeplabv2(
    num_classes: int,
    backbone: str = "resnet101_os8",
    pretrained: str = "none",
    freeze_bn: bool = False,
    rates: Sequence[int] = DEEPLABV2_RATES,
    init_std: float = 0.01,
) -> DeepLabV2:
    """DeepLab-v2 (BECO/KTSE): dilated ResNet (output stride 8) + summed ASPP 6/12/18/24."""
    bb = _os8_backbone("deeplabv2", backbone, pretrained, freeze_bn, "resnet101_os8, resnet18_os8")
    return DeepLabV2(bb, num_classes, rates=rates, init_std=init_std)


@SEG_MODELS.register("deeplabv1")
def deeplabv1(
    num_classes: int,
    backbone: str = "resnet38",
    pretrained: str = "none",
    freeze_bn: bool = False,
    channels: int = DEEPLABV1_CHANNELS,
    dilation: int = DEEPLABV1_DILATION,
    dropout: float = 0.5,
) -> DeepLabV1:
    """DeepLab-v1 LargeFOV (SEAM/HFPL): output-stride-8 backbone (ResNet-38) + 3x3 dil-12 / 1x1 head."""
    bb = _os8_backbone("deeplabv1", backbone, pretrained, freeze_bn, "resnet38, resnet18_os8")
    return DeepLabV1(bb, num_classes, channels=channels, dilation=dilation, dropout=dropout)


@SEG_MODELS.register("deeplabv3plus")
def deeplabv3plus(
    num_classes: int,
    backbone: str = "resnet101",
    pretrained: str = "none",
    freeze_bn: bool = False,
    rates: Optional[Sequence[int]] = None,
    aspp_channels: int = 256,
    low_level_tap: Optional[str] = None,
    low_level_channels: int = 48,
    decoder_channels: int = 256,
    dropout: float = 0.1,
) -> DeepLabV3Plus:
    """DeepLab-v3+ on our backbones' taps (stride-4 tap + final map)."""
    bb = _backbone(backbone, pretrained, freeze_bn)
    return DeepLabV3Plus(
        bb,
        num_classes,
        rates=rates,
        aspp_channels=aspp_channels,
        low_level_tap=low_level_tap,
        low_level_channels=low_level_channels,
        decoder_channels=decoder_channels,
        dropout=dropout,
    )


def build_seg_model(
    name: str,
    num_classes: int,
    backbone: Optional[str] = None,
    pretrained: Optional[str] = "none",
    freeze_bn: bool = False,
    **options: Any,
) -> SegModel:
    """Build the registered segmentation model ``name``; unknown names raise KeyError listing valid ones.

    ``backbone=None`` keeps the model's default backbone. ``options`` are the model's keyword
    options (``rates``, ``init_std``, ``aspp_channels``, ...); an unknown option raises TypeError
    naming it.
    """
    fn = SEG_MODELS.get(name)
    try:
        return SEG_MODELS.build(
            name, num_classes=num_classes, backbone=backbone, pretrained=pretrained, freeze_bn=freeze_bn, **options
        )
    except TypeError as e:
        raise TypeError(f"segmentation model {name!r} ({fn.__doc__ or ''}): {e}") from e


def list_seg_models() -> List[str]:
    return SEG_MODELS.names()


__all__ = [
    "SEG_MODELS",
    "SegModel",
    "DeepLabV1",
    "DeepLabV2",
    "DeepLabV3Plus",
    "ASPPv2",
    "ASPPv3",
    "build_seg_model",
    "list_seg_models",
]
