"""ResNet-38 ("Model A1" of Wu et al., *Wider or Deeper*), the backbone of the ResNet-38 WSSS repos.

Layout (the ``resnet38d.py`` of the official AEFT/ACR/HFPL/SMAF/KTSE code; docs/official_code.md),
output stride 8, every conv bias-free:

==========  ==========================================  ===========================
module      block                                       out channels, stride, dil.
==========  ==========================================  ===========================
conv1a      3x3 conv 3->64                              64, 1
b2, b2_1-2  pre-activation 3x3/3x3 blocks               128, 2 (first block)
b3, b3_1-2  "                                           256, 4
b4, b4_1-5  "                                           512, 8
b5, b5_1-2  " (mid 512)                                 1024, 8, dilation 2
b6          bottleneck 1x1/3x3/1x1 (1024->2048)         2048, 8, dilation 4
b7          bottleneck (2048->4096)                     4096, 8, dilation 4
bn7         BN + ReLU                                   4096
==========  ==========================================  ===========================

Blocks are pre-activation: ``a = relu(bn(x))`` feeds both the main path and, when the shape
changes, the 1x1 shortcut conv (the shortcut is taken from the BN-ReLU'd input, not from ``x``).
Submodule and parameter names are those of the official PyTorch ports (``conv1a.weight``,
``b2.bn_branch2a.running_mean``, ``b2.conv_branch1.weight``, ``b6.conv_branch2b2.weight``,
``bn7.weight``, ...), so a state_dict converted from the MXNet ImageNet file loads directly
(see ``docs/resnet38_weights.md``).

Taps (``forward_dict``): ``conv4`` = the BN-ReLU'd input of b5 (512 ch), ``conv5`` = the BN-ReLU'd
input of b6 (1024 ch), ``conv6`` = ``relu(bn7(b7))`` (4096 ch) and ``out`` = ``conv6``; all at
stride 8.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import BACKBONES, Backbone


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        cin, cout, kernel, stride=stride, padding=dilation * (kernel - 1) // 2, dilation=dilation, bias=False
    )


class ResBlock(nn.Module):
    """Pre-activation block: BN-ReLU, 3x3 (stride, ``first_dilation``), BN-ReLU, 3x3 (``dilation``)."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int = 1,
        first_dilation: Optional[int] = None,
        dilation: int = 1,
    ):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = _conv(in_channels, mid_channels, 3, stride, first_dilation)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = _conv(mid_channels, out_channels, 3, 1, dilation)
        self.has_projection = in_channels != out_channels or stride != 1
        if self.has_projection:
            self.conv_branch1 = _conv(in_channels, out_channels, 1, stride)

    def forward_with_preact(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(block output, relu(bn(x)))``."""
        a = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(a) if self.has_projection else x
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a))))
        return shortcut + y, a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_preact(x)[0]


class ResBlockBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU, 1x1 (out/4), BN-ReLU-Dropout2d, 3x3 dilated (out/2),
    BN-ReLU-Dropout2d, 1x1 (out); shortcut is a 1x1 conv of the BN-ReLU'd input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        q, h = out_channels // 4, out_channels // 2
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = _conv(in_channels, q, 1, stride)
        self.bn_branch2b1 = nn.BatchNorm2d(q)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = _conv(q, h, 3, 1, dilation)
        self.bn_branch2b2 = nn.BatchNorm2d(h)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = _conv(h, out_channels, 1)
        self.conv_branch1 = _conv(in_channels, out_channels, 1, stride)

    def forward_with_preact(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a = F.relu(self.bn_branch2a(x))
        y = self.conv_branch2a(a)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return self.conv_branch1(a) + y, a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_preact(x)[0]


class ResNet38(Backbone):
    """ResNet-38 (A1), output stride 8, 4096-channel output.

    ``dropout`` = Dropout2d probabilities of (b6, b7): (0.3, 0.5) in the plain ``Net`` of PSA, HFPL
    and SMAF; (0.2, 0.2) in the GPP nets of AEFT and KTSE and in ACR. ``trainable_from`` is one of
    ``conv1a, b2, b3, b4, b5, b6, b7`` (each group with its ``_k`` blocks; b7 includes bn7);
    the default ``"b3"`` freezes conv1a and b2-b2_2, as AEFT, KTSE, HFPL and SMAF do (PSA's plain
    net freezes only conv1a = ``"b2"``; ACR freezes nothing = ``"all"``).
    """

    def __init__(
        self,
        dropout: Sequence[float] = (0.3, 0.5),
        freeze_bn: bool = True,
        trainable_from: Optional[str] = "b3",
    ):
        super().__init__(freeze_bn=freeze_bn, trainable_from=trainable_from)
        dropout = tuple(float(p) for p in dropout)
        if len(dropout) != 2 or not all(0.0 <= p < 1.0 for p in dropout):
            raise ValueError(f"dropout must be two probabilities in [0, 1) for (b6, b7), got {dropout!r}")
        self.dropout = dropout

        self.conv1a = _conv(3, 64, 3)

        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)

        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)

        self.b4 = ResBlock(256, 512, 512, stride=2)
        for i in range(1, 6):
            setattr(self, f"b4_{i}", ResBlock(512, 512, 512))

        self.b5 = ResBlock(512, 512, 1024, stride=1, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)

        self.b6 = ResBlockBottleneck(1024, 2048, dilation=4, dropout=dropout[0])
        self.b7 = ResBlockBottleneck(2048, 4096, dilation=4, dropout=dropout[1])
        self.bn7 = nn.BatchNorm2d(4096)

        self.out_channels = 4096
        self.output_stride = 8
        self.tap_channels = {"conv4": 512, "conv5": 1024, "conv6": 4096, "out": 4096}
        self.tap_strides = {name: 8 for name in self.tap_channels}
        self._setup_freezing()

    def _group(self, prefix: str) -> List[nn.Module]:
        return [m for name, m in self.named_children() if name == prefix or name.startswith(prefix + "_")]

    def stage_modules(self) -> List[Tuple[str, List[nn.Module]]]:
        stages = [("conv1a", [self.conv1a])]
        stages += [(f"b{i}", self._group(f"b{i}")) for i in range(2, 7)]
        stages.append(("b7", [self.b7, self.bn7]))
        return stages

    def _plain_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for block in self._group(name):
            x = block(x)
        return x

    def _b5(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x, conv4 = self.b5.forward_with_preact(x)
        return self.b5_2(self.b5_1(x)), conv4

    def _b7(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn7(self.b7(x)))

    def forward_dict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self._run_stage("conv1a", self.conv1a, x)
        for name in ("b2", "b3", "b4"):
            x = self._run_stage(name, self._plain_stage, name, x)
        x, conv4 = self._run_stage("b5", self._b5, x)
        x, conv5 = self._run_stage("b6", self.b6.forward_with_preact, x)
        conv6 = self._run_stage("b7", self._b7, x)
        return {"conv4": conv4, "conv5": conv5, "conv6": conv6, "out": conv6}


@BACKBONES.register("resnet38")
def resnet38(
    dropout: Sequence[float] = (0.3, 0.5), freeze_bn: bool = True, trainable_from: Optional[str] = "b3"
) -> ResNet38:
    """ResNet-38 (A1), output stride 8; ``dropout`` = (b6, b7) Dropout2d probabilities."""
    return ResNet38(dropout=dropout, freeze_bn=freeze_bn, trainable_from=trainable_from)
