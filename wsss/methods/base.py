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
* ``schedule_max_step(num_images, epochs)``: the ``max_step`` of the poly learning-rate schedule,
  or None (default) for the number of updates the training really makes (AEFT and KTSE: their
  official code's count, :func:`early_batch_poly_steps`);
* ``train_step(batch, ctx, optimizer, scaler)`` (optional override): methods with several
  optimisers or phases (ACR) take over the update; the default is one summed backward pass;
* ``required_files(options)`` (a classmethod): model files that training with these
  ``method_options`` reads besides the data (SMAF's teacher, ACR's initialisations); the workflow
  makes them inputs of the training job. Default: none.
* ``needs_saliency`` (class attribute, default False): training batches must carry ``saliency``
  (``B x 1 x H x W`` in [0, 1], the off-the-shelf saliency map cropped with the image; EPS); the
  classification dataset loads it and the workflow makes the saliency maps an input of the
  training job only for such methods.

``C`` is the number of foreground classes; methods with a background output (KTSE: C+1) still
return only the foreground maps from ``cam``.

The builders that use the registry (``build_method``, ``list_methods``, ``build_classifier``,
``required_files``) are in the package, :mod:`wsss.methods`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

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
    #: whether training batches need ``batch["saliency"]`` (module docstring)
    needs_saliency: bool = False

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

    def schedule_max_step(self, num_images: int, epochs: int) -> Optional[int]:
        return None

    @classmethod
    def required_files(cls, options: Mapping[str, Any]) -> List[str]:
        """Files (paths as given in ``options``, the config's ``classifier.method_options``) that
        building and training this method reads besides the data, e.g. a teacher model; the
        workflow makes them inputs of the classifier training so that they are made first."""
        return []

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride


#: values of the AEFT / KTSE option ``poly_steps``
POLY_STEPS = ("reference", "actual")


def early_batch_poly_steps(mode: str, num_images: int, epochs: int, early_batch_size: int) -> Optional[int]:
    """``max_step`` of the poly schedule of a method that trains with ``early_batch_size`` before a
    switch epoch (AEFT, KTSE). ``reference``: ``num_images // early_batch_size * epochs``, the
    official count (AEFT ``train.py``: ``train_num_img // 8 * max_epochs``; KTSE: ``1322 * 40``),
    which assumes the early batch for every epoch, so the learning rate decays only part of the way
    (about 0.45 x lr0 on VOC for AEFT); ``actual`` (or ``early_batch_size`` 0): None, the updates
    the training really makes (the learning rate decays to 0)."""
    if mode not in POLY_STEPS:
        raise ValueError(f"poly_steps must be one of {', '.join(POLY_STEPS)}, got {mode!r}")
    if mode == "actual" or early_batch_size <= 0:
        return None
    return max(1, num_images // early_batch_size * epochs)


#: Suffix of the ISL/FSL add-on (HFPL): ``"<method>+islfsl"`` wraps any registered method that
#: implements the protocol of ``wsss.methods.islfsl`` (docs/methods/islfsl.md).
ISLFSL_SUFFIX = "+islfsl"
