"""IRN's config parameters: one frozen dataclass per stage (``irn.ir_label``, ``irn.train``,
``irn.infer``), defaults = the reference values, checked on construction.

Kept apart from :mod:`wsss.refine.irn` (the network and the stages) so that config validation
(:func:`wsss.config.validate_config`) checks these sections without importing the IRN stages
or torch (this module imports nothing but the standard library).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

#: The CAM / boundary maps are at stride 4 of the image (ceil(H/4) x ceil(W/4)); hard-coded in IRN.
STRIDE = 4
#: The random walks of :func:`wsss.refine.random_walk.random_walk` (``irn.infer.walk``).
WALKS = ("sparse", "dense")

__all__ = ["IRLabelParams", "IRNTrainParams", "IRNInferParams"]


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


class _Params:
    """``from_mapping`` for the parameter dataclasses: unknown keys raise naming the section."""

    SECTION = "irn"

    @classmethod
    def from_mapping(cls, m: Optional[Mapping[str, Any]]):
        if isinstance(m, cls):
            return m
        m = dict(m or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(m) - set(names))
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in config section '{cls.SECTION}'; valid keys: {', '.join(names)}"
            )
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in m.items()})

    def _fail(self, key: str, msg: str) -> None:
        raise ValueError(f"{self.SECTION}.{key} {msg}, got {getattr(self, key)!r}")

    def _number(self, key: str, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> None:
        v = getattr(self, key)
        if not _is_number(v) or v < lo or v > hi or (lo_open and v == lo):
            self._fail(key, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}]")

    def _integer(self, key: str, lo: int) -> None:
        v = getattr(self, key)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            self._fail(key, f"must be an integer >= {lo}")


@dataclass(frozen=True)
class IRLabelParams(_Params):
    """``irn.ir_label``: thresholds of :func:`cam_to_ir_label` and the IRN label-CRF keyword
    arguments (``t, gt_prob, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat``; unset keys keep
    :func:`wsss.refine.crf.crf_inference_label`'s defaults = the reference values)."""

    SECTION = "irn.ir_label"
    fg_thresh: float = 0.30
    bg_thresh: float = 0.05
    crf: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self._number("fg_thresh", 0.0, 1.0)
        self._number("bg_thresh", 0.0, 1.0)
        if self.bg_thresh > self.fg_thresh:
            raise ValueError(
                f"irn.ir_label.bg_thresh ({self.bg_thresh}) must not exceed irn.ir_label.fg_thresh ({self.fg_thresh})"
            )
        if not isinstance(self.crf, Mapping):
            self._fail("crf", "must be a mapping of CRF keyword arguments")
        valid = {"t", "gt_prob", "gauss_sxy", "gauss_compat", "bi_sxy", "bi_srgb", "bi_compat"}
        unknown = sorted(set(self.crf) - valid)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in irn.ir_label.crf; valid keys: {', '.join(sorted(valid))}")


@dataclass(frozen=True)
class IRNTrainParams(_Params):
    """``irn.train``: IRN network, training data and optimisation (reference values)."""

    SECTION = "irn.train"
    backbone: str = "resnet50"
    pretrained: str = "imagenet"
    crop_size: int = 512
    rescale: Tuple[float, float] = (0.5, 1.5)
    hflip: bool = True
    radius: int = 10
    batch_size: int = 32
    epochs: int = 3
    lr: float = 0.1
    edge_lr_mult: float = 1.0
    dp_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    momentum_mode: str = "reference"
    momentum: float = 0.9
    poly_power: float = 0.9
    amp: bool = True
    seed: int = 0
    affinity_weight: float = 0.5
    displacement_weight: float = 0.5
    mean_shift_crop_size: int = 512
    mean_shift_batch_size: int = 32

    def __post_init__(self):
        if not isinstance(self.backbone, str):
            self._fail("backbone", "must be a backbone name")
        self._integer("crop_size", STRIDE)
        if self.crop_size % STRIDE:
            self._fail("crop_size", f"must be a multiple of {STRIDE} (the IR label is downscaled by {STRIDE})")
        if not (isinstance(self.rescale, tuple) and len(self.rescale) == 2 and all(_is_number(v) and v > 0 for v in self.rescale)
                and self.rescale[0] <= self.rescale[1]):
            self._fail("rescale", "must be [low, high] with 0 < low <= high")
        self._integer("radius", 2)
        for k in ("batch_size", "epochs", "mean_shift_batch_size"):
            self._integer(k, 1)
        self._integer("mean_shift_crop_size", STRIDE)
        self._integer("seed", 0)
        for k in ("lr", "edge_lr_mult", "dp_lr_mult", "weight_decay", "momentum", "poly_power",
                  "affinity_weight", "displacement_weight"):
            self._number(k, 0.0)
        if self.momentum_mode not in ("reference", "standard"):
            self._fail("momentum_mode", "must be 'reference' or 'standard'")
        for k in ("hflip", "amp"):
            if not isinstance(getattr(self, k), bool):
                self._fail(k, "must be true or false")


@dataclass(frozen=True)
class IRNInferParams(_Params):
    """``irn.infer``: boundary inference, random walk and labels (reference values)."""

    SECTION = "irn.infer"
    radius: int = 5
    beta: float = 10.0
    exp_times: int = 8
    bg_thresh: float = 0.25
    pad_to: int = 512
    walk: str = "sparse"
    confidence_ratio: float = 0.5

    def __post_init__(self):
        self._integer("radius", 2)
        self._number("beta", 0.0, lo_open=True)
        self._integer("exp_times", 0)
        self._number("bg_thresh", 0.0, 1.0)
        self._integer("pad_to", 0)
        if self.walk not in WALKS:
            self._fail("walk", f"must be one of {', '.join(WALKS)}")
        self._number("confidence_ratio", 0.0, 1.0)

