"""The method interface: one class per WSSS method, trained by the one engine (``wsss.engine``).

A method owns its networks (a backbone from ``wsss.models`` plus heads) and exposes:

* ``param_groups()``: parameter groups with an ``lr_mult`` (and optional ``weight_decay``) each;
* ``losses(batch, ctx)``: a dict of *named, already weighted* loss terms; the engine sums them,
  back-propagates once and logs every term;
* ``cam(images)``: raw class activation maps ``B x C x h x w`` (ReLU'd, at feature resolution) that
  multi-scale inference fuses; ``logits(images)``: image-level scores ``B x C``;
* ``raw_cam(images)`` (optional): the same maps before the ReLU, for ``cam.upsample:
  raw_then_relu``; ``cam_upsample``: the method's default order of ReLU and resizing at CAM
  inference, ``relu_then_raw`` (IRN) or ``raw_then_relu`` (AEFT/KTSE/ACR), see
  :mod:`wsss.cam_infer`;
* ``batch_size_for_epoch(epoch, base)``: the batch size of an epoch (AEFT switches it; default
  constant);
* ``train_step(batch, ctx, optimizer, scaler)`` (optional override): methods with several
  optimisers or phases (ACR) take over the update; the default is one summed backward pass.

``C`` is the number of foreground classes; methods with a background output (KTSE: C+1) still
return only the foreground maps from ``cam``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import torch
from torch import nn

from ..registry import Registry

METHODS = Registry("method")


@dataclass
class StepContext:
    """What a method may need to know about the current step."""

    step: int
    max_step: int
    epoch: int
    max_epoch: int
    device: torch.device


class Method(nn.Module):
    """Base class; subclasses register themselves with ``@METHODS.register("name")``."""

    name: str = "base"

    def param_groups(self) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    #: default of ``cam.upsample: auto`` (wsss.cam_infer): the order of the official inference code
    cam_upsample: str = "relu_then_raw"

    def cam(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def raw_cam(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`cam` before its ReLU (needed by ``cam.upsample: raw_then_relu``)."""
        raise NotImplementedError(f"method {self.name!r} has no raw (pre-ReLU) CAM; use cam.upsample: relu_then_raw")

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_size_for_epoch(self, epoch: int, base: int) -> int:
        return base

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride


def _load_builtin_methods() -> None:
    """Import every module of ``wsss.methods`` so their ``@METHODS.register`` decorators run."""
    import importlib
    import pkgutil

    from .. import methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{pkg.__name__}.{info.name}")


#: Suffix of the ISL/FSL add-on (HFPL): ``"<method>+islfsl"`` wraps any registered method that
#: implements the protocol of ``wsss.methods.islfsl`` (docs/methods/islfsl.md).
ISLFSL_SUFFIX = "+islfsl"


def build_method(name: str, num_classes: int, backbone: nn.Module, **options: Any) -> Method:
    """Build the registered method ``name``; unknown names raise KeyError listing valid ones.

    ``"<method>+islfsl"`` builds ``<method>`` wrapped by the ISL/FSL add-on; its options are
    ``options["islfsl"]`` (a mapping), every other option goes to ``<method>``.
    """
    _load_builtin_methods()
    if name.endswith(ISLFSL_SUFFIX):
        from .islfsl import build_islfsl

        return build_islfsl(name[: -len(ISLFSL_SUFFIX)], num_classes=num_classes, backbone=backbone, **options)
    return METHODS.build(name, num_classes=num_classes, backbone=backbone, **options)


def list_methods() -> List[str]:
    """Registered names plus ``"<name>+islfsl"`` for each method that supports the add-on."""
    _load_builtin_methods()
    from .islfsl import supports_islfsl

    names = METHODS.names()
    return sorted(names + [n + ISLFSL_SUFFIX for n in names if supports_islfsl(METHODS.get(n))])
