"""Backbone interface, the backbone registry and the torchvision ResNets in the IRN layout.

Every backbone is a :class:`Backbone`: ``forward(x)`` gives the final feature map (what a CAM
classifier reads), ``forward_dict(x)`` gives the named intermediate taps in order with the final
map under ``"out"``. ``out_channels``, ``output_stride``, ``tap_channels`` and ``tap_strides``
describe the outputs without running the network.

Two freezing options are shared by all backbones:

* ``freeze_bn`` (default True): every BatchNorm stays in eval mode (running statistics never
  change) and its affine parameters get ``requires_grad=False``, also after ``.train()``. This is
  IRN's ``FixedBatchNorm`` and the ``train()`` override of the official ResNet-38 repos.
* ``trainable_from``: the name of the first stage that trains. Earlier stages get
  ``requires_grad=False``, stay in eval mode and run under ``torch.no_grad()``, so their outputs
  are detached (IRN's CAM net detaches after ``stage2``). ``None`` or ``"all"`` trains everything
  (``build_backbone`` passes an explicit ``trainable_from=None`` on as ``"all"``, although
  :meth:`Registry.build` drops other ``None`` values); leaving the key out keeps the backbone's
  default (``"stage3"`` for the ResNets, ``"b3"`` for ResNet-38).

Build backbones with :func:`build_backbone`; it looks the name up in :data:`BACKBONES` and loads
weights with :func:`wsss.models.weights.load_pretrained`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from ..registry import Registry
from .weights import load_pretrained

BACKBONES = Registry("backbone")

_ALL = "all"


class Backbone(nn.Module):
    """Base class: the interface every backbone implements, and the shared freezing logic.

    Subclasses set ``out_channels``, ``output_stride``, ``tap_channels`` and ``tap_strides``,
    implement :meth:`stage_modules` and :meth:`forward_dict`, and call :meth:`_setup_freezing`
    at the end of ``__init__``.
    """

    out_channels: int
    output_stride: int
    tap_channels: Dict[str, int]
    tap_strides: Dict[str, int]

    def __init__(self, freeze_bn: bool = True, trainable_from: Optional[str] = None):
        super().__init__()
        self.freeze_bn = bool(freeze_bn)
        self._trainable_from_arg = trainable_from

    # -- interface -----------------------------------------------------------------------------
    def stage_modules(self) -> List[Tuple[str, List[nn.Module]]]:
        """``(stage name, modules)`` in forward order; ``trainable_from`` names one of them."""
        raise NotImplementedError

    def forward_dict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_dict(x)["out"]

    # -- freezing ------------------------------------------------------------------------------
    @property
    def stage_names(self) -> List[str]:
        return [name for name, _ in self.stage_modules()]

    @property
    def trainable_from(self) -> Optional[str]:
        """The first trained stage, or ``None`` when every stage trains."""
        return self._trainable_from

    def _setup_freezing(self) -> None:
        names = self.stage_names
        arg = self._trainable_from_arg
        if arg is None or arg == _ALL or arg == names[0]:
            self._trainable_from = None
            self._num_frozen_stages = 0
        elif arg in names:
            self._trainable_from = arg
            self._num_frozen_stages = names.index(arg)
        else:
            valid = ", ".join([_ALL] + names)
            raise ValueError(f"{type(self).__name__}: unknown trainable_from {arg!r}; valid values: None, {valid}")
        self._frozen_stage_names = frozenset(names[: self._num_frozen_stages])
        self.train(self.training)

    def is_frozen_stage(self, name: str) -> bool:
        return name in self._frozen_stage_names

    def frozen_modules(self) -> List[nn.Module]:
        """The modules of the stages before ``trainable_from``."""
        return [m for _, mods in self.stage_modules()[: self._num_frozen_stages] for m in mods]

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
                    for p in module.parameters(recurse=False):
                        p.requires_grad_(False)
        return self

    def _run_stage(self, name: str, fn, *args: Any) -> Any:
        """Run one stage; frozen stages run without autograd, so their outputs are detached."""
        if self.is_frozen_stage(name):
            with torch.no_grad():
                return fn(*args)
        return fn(*args)

    def extra_repr(self) -> str:
        return (
            f"out_channels={self.out_channels}, output_stride={self.output_stride}, "
            f"freeze_bn={self.freeze_bn}, trainable_from={self.trainable_from!r}"
        )


# ----------------------------------------------------------------------------------------------
# torchvision ResNets
# ----------------------------------------------------------------------------------------------

_RESNET_SPECS = {
    # name: (block, layers)
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tv_resnet.Bottleneck, [3, 4, 23, 3]),
}


def _set_conv(conv: nn.Conv2d, stride: Optional[int] = None, dilation: Optional[int] = None) -> None:
    """Change a conv's stride and/or dilation in place (padding follows a 3x3 kernel's dilation)."""
    if stride is not None:
        conv.stride = (stride, stride)
    if dilation is not None and conv.kernel_size != (1, 1):
        conv.dilation = (dilation, dilation)
        conv.padding = (dilation * (conv.kernel_size[0] - 1) // 2,) * 2


def _remove_stride(layer: nn.Sequential) -> None:
    """Make the first block of ``layer`` stride 1 (main-path conv and downsample shortcut)."""
    for conv in layer[0].modules():
        if isinstance(conv, nn.Conv2d) and conv.stride != (1, 1):
            _set_conv(conv, stride=1)


def _dilate_basic_layer(layer: nn.Sequential, previous_dilation: int, dilation: int) -> None:
    """Replace the stride of a BasicBlock layer by dilation, as torchvision does for Bottleneck.

    torchvision's ``replace_stride_with_dilation`` gives the stride-carrying 3x3 conv of the first
    block the previous dilation and every later 3x3 conv the new one; the same rule here: block 0
    ``conv1`` keeps ``previous_dilation`` (stride removed), block 0 ``conv2`` and all convs of the
    later blocks use ``dilation``.
    """
    _remove_stride(layer)
    for i, block in enumerate(layer):
        _set_conv(block.conv1, dilation=previous_dilation if i == 0 else dilation)
        _set_conv(block.conv2, dilation=dilation)


class ResNet(Backbone):
    """A torchvision ResNet without ``avgpool``/``fc``, split into IRN's four stages.

    ``stage1`` = conv1+bn1+relu+maxpool+layer1 (stride 4), ``stage2`` = layer2 (8),
    ``stage3`` = layer3 (16), ``stage4`` = layer4. Output stride 16 is IRN's layout (layer4 stride 1,
    no dilation); output stride 8 replaces the strides of layer3 and layer4 by dilation 2 and 4.
    Submodule names are torchvision's, so torchvision state_dicts load directly.
    """

    def __init__(
        self,
        arch: str,
        output_stride: int = 16,
        freeze_bn: bool = True,
        trainable_from: Optional[str] = "stage3",
    ):
        super().__init__(freeze_bn=freeze_bn, trainable_from=trainable_from)
        if arch not in _RESNET_SPECS:
            raise KeyError(f"unknown ResNet arch {arch!r}; valid: {', '.join(_RESNET_SPECS)}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        block, layers = _RESNET_SPECS[arch]
        dilate = output_stride == 8
        if block is tv_resnet.Bottleneck:
            net = tv_resnet.ResNet(block, layers, replace_stride_with_dilation=[False, dilate, dilate])
        else:
            net = tv_resnet.ResNet(block, layers)  # torchvision refuses dilation for BasicBlock
            if dilate:
                _dilate_basic_layer(net.layer3, previous_dilation=1, dilation=2)
                _dilate_basic_layer(net.layer4, previous_dilation=2, dilation=4)
        if not dilate:
            _remove_stride(net.layer4)  # IRN: strides (2, 2, 2, 1), no dilation

        self.arch = arch
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

        width = 512 * block.expansion
        self.out_channels = width
        self.output_stride = output_stride
        self.tap_channels = {
            "stage1": width // 8,
            "stage2": width // 4,
            "stage3": width // 2,
            "stage4": width,
            "out": width,
        }
        self.tap_strides = {
            "stage1": 4,
            "stage2": 8,
            "stage3": 16 if output_stride == 16 else 8,
            "stage4": output_stride,
            "out": output_stride,
        }
        self._setup_freezing()

    def stage_modules(self) -> List[Tuple[str, List[nn.Module]]]:
        return [
            ("stage1", [self.conv1, self.bn1, self.layer1]),
            ("stage2", [self.layer2]),
            ("stage3", [self.layer3]),
            ("stage4", [self.layer4]),
        ]

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    def forward_dict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        taps: Dict[str, torch.Tensor] = {}
        taps["stage1"] = x = self._run_stage("stage1", self._stem, x)
        taps["stage2"] = x = self._run_stage("stage2", self.layer2, x)
        taps["stage3"] = x = self._run_stage("stage3", self.layer3, x)
        taps["stage4"] = x = self._run_stage("stage4", self.layer4, x)
        taps["out"] = x
        return taps


def _register_resnet(name: str, arch: str, output_stride: int) -> None:
    def build(freeze_bn: bool = True, trainable_from: Optional[str] = "stage3") -> ResNet:
        return ResNet(arch, output_stride=output_stride, freeze_bn=freeze_bn, trainable_from=trainable_from)

    build.__name__ = name
    build.__doc__ = f"torchvision {arch}, IRN stage layout, output stride {output_stride}."
    BACKBONES.register(name)(build)


for _arch in _RESNET_SPECS:
    _register_resnet(_arch, _arch, 16)
    _register_resnet(f"{_arch}_os8", _arch, 8)


# ----------------------------------------------------------------------------------------------
# factory
# ----------------------------------------------------------------------------------------------


def build_backbone(name: str, pretrained: Optional[str] = "none", **kwargs: Any) -> Backbone:
    """Build the backbone registered as ``name`` and load ``pretrained`` weights into it.

    ``pretrained`` is ``"none"`` (random init), ``"imagenet"`` (torchvision weights for the
    ResNets) or a path to a state_dict file; see :func:`wsss.models.weights.load_pretrained`.
    Unknown names raise ``KeyError`` listing the registered names. ``None``-valued ``kwargs`` are
    dropped so that unset config keys keep the defaults, except ``trainable_from=None``, which
    means "train every stage" and is passed on as ``"all"``.
    """
    if "trainable_from" in kwargs and kwargs["trainable_from"] is None:
        kwargs["trainable_from"] = _ALL
    model = BACKBONES.build(name, **kwargs)
    load_pretrained(model, "none" if pretrained is None else pretrained, name)
    return model


def list_backbones() -> List[str]:
    return BACKBONES.names()


__all__ = ["BACKBONES", "Backbone", "ResNet", "build_backbone", "list_backbones"]
