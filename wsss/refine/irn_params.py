"""IRN's config parameters: one frozen dataclass per stage (``irn.ir_label``, ``irn.train``,
``irn.infer``), a typed view of the section validated against the config schema.

The keys, their types, ranges and defaults live in the schema only
(``wsss/schemas/config.schema.yaml``); :meth:`from_mapping` fills missing keys with the schema's
defaults (:func:`wsss.config.validate_section`) and checks the values, naming the key. Kept apart
from :mod:`wsss.refine.irn` (the network and the stages) so that it imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from ..config import validate_section
from .walk_steps import scaled_walk_exponent

#: The CAM / boundary maps are at stride 4 of the image (ceil(H/4) x ceil(W/4)); hard-coded in IRN.
STRIDE = 4
#: The random walks of :func:`wsss.refine.random_walk.random_walk` (``irn.infer.walk``, the schema's enum).
WALKS = ("sparse", "dense")

__all__ = ["IRLabelParams", "IRNTrainParams", "IRNInferParams"]


class _Params:
    """``from_mapping`` for the parameter dataclasses: the schema's defaults and checks."""

    SECTION = "irn"

    @classmethod
    def from_mapping(cls, m: Optional[Mapping[str, Any]]):
        """``m`` (a possibly partial section; ``None`` = all defaults) validated against the schema
        with missing keys at their schema defaults; :class:`wsss.config.ConfigError` (a
        ``ValueError``) names a bad or unknown key."""
        if isinstance(m, cls):
            return m
        values = validate_section(cls.SECTION, m)
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})


@dataclass(frozen=True)
class IRLabelParams(_Params):
    """``irn.ir_label``: thresholds of :func:`cam_to_ir_label` and the IRN label-CRF keyword
    arguments (``t, gt_prob, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat``; unset keys keep
    :func:`wsss.refine.crf.crf_inference_label`'s defaults = the reference values)."""

    SECTION = "irn.ir_label"
    fg_thresh: float
    bg_thresh: float
    crf: Mapping[str, Any]


@dataclass(frozen=True)
class IRNTrainParams(_Params):
    """``irn.train``: IRN network, training data and optimisation."""

    SECTION = "irn.train"
    backbone: str
    pretrained: str
    trainable_from: Optional[str]
    crop_size: int
    rescale: Tuple[float, float]
    hflip: bool
    radius: int
    batch_size: int
    epochs: int
    optimizer: str
    lr: float
    edge_lr_mult: float
    dp_lr_mult: float
    weight_decay: float
    momentum_mode: str
    momentum: float
    poly_power: float
    amp: bool
    seed: int
    affinity_weight: float
    displacement_weight: float
    mean_shift_crop_size: int
    mean_shift_batch_size: int


@dataclass(frozen=True)
class IRNInferParams(_Params):
    """``irn.infer``: boundary inference, random walk and labels."""

    SECTION = "irn.infer"
    radius: int
    beta: float
    exp_times: int
    walk_size: Optional[int]
    bg_thresh: float
    pad_to: int
    walk: str
    confidence_ratio: float

    def steps_exponent(self, map_size: Tuple[int, int]) -> int:
        """The walk's ``exp_times`` for a stride-4 map of ``map_size`` (h, w): ``exp_times`` itself
        (``walk_size`` null, IRN), else ``round(exp_times + 2 log2(max(h, w) / walk_size))``, at
        least 0. A walk of ``2^e`` steps spreads a score over a distance that grows like
        ``radius * 2^(e/2)``; scaling ``2^e`` with the squared map size keeps that reach the same
        fraction of the image as at IRN's ``walk_size`` (125 = VOC's 500-pixel long side / 4)."""
        return scaled_walk_exponent(self.exp_times, map_size, self.walk_size)
