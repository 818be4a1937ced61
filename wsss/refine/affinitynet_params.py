"""AffinityNet's config parameters: one frozen dataclass per stage (``affinitynet.label``,
``affinitynet.train``, ``affinitynet.infer``), checked on construction, and the per-paper
:data:`PRESETS`.

The defaults are read from the config schema (``wsss/schemas/config.schema.yaml``, section
``affinitynet``): one source of truth, the PSA values (docs/affinitynet.md). A schema section whose
keys differ from a dataclass's fields fails at import.

Kept apart from :mod:`wsss.refine.affinitynet` (the network and the stages) so that config
validation and the ``affinity_labels_shard`` rule (``crf`` conda env) import no torch;
:mod:`wsss.refine.affinitynet` re-exports these names.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from .walk_steps import scaled_walk_exponent

__all__ = [
    "WALKS",
    "PSA_CRF_KEYS",
    "is_number",
    "PRESETS",
    "SCHEMA_DEFAULTS",
    "AffinityLabelParams",
    "AffinityTrainParams",
    "AffinityInferParams",
]

WALKS = ("sparse", "dense")
#: Keyword arguments of the PSA CRF (:func:`wsss.refine.crf.crf_with_alpha`).
PSA_CRF_KEYS = frozenset({"t", "gauss_sxy", "gauss_compat", "bi_sxy", "bi_srgb", "bi_compat"})


#: The config schema (read directly: :mod:`wsss.config` imports this module to check the section).
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


def _schema_defaults() -> Dict[str, Dict[str, Any]]:
    props = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]["affinitynet"]["properties"]
    return {sub: {k: v["default"] for k, v in props[sub]["properties"].items()} for sub in ("label", "train", "infer")}


#: ``{"label" | "train" | "infer": {key: default}}`` as the schema states them.
SCHEMA_DEFAULTS: Dict[str, Dict[str, Any]] = _schema_defaults()


def _default(sub: str, key: str) -> Any:
    """The schema's default of ``affinitynet.<sub>.<key>`` as a dataclass default (lists become
    tuples, mappings a ``default_factory``)."""
    v = SCHEMA_DEFAULTS[sub][key]
    if isinstance(v, Mapping):
        return field(default_factory=lambda: copy.deepcopy(dict(v)))
    return tuple(v) if isinstance(v, list) else v


def is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


class _Params:
    """``from_mapping`` and checks for the parameter dataclasses (unknown keys name the section)."""

    SECTION = "affinitynet"

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
        if not is_number(v) or v < lo or v > hi or (lo_open and v == lo):
            self._fail(key, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}]")

    def _integer(self, key: str, lo: int) -> None:
        v = getattr(self, key)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            self._fail(key, f"must be an integer >= {lo}")

    def _bool(self, key: str) -> None:
        if not isinstance(getattr(self, key), bool):
            self._fail(key, "must be true or false")


@dataclass(frozen=True)
class AffinityLabelParams(_Params):
    """``affinitynet.label``: the two "CRF with alpha" runs whose label maps make the training
    labels (:func:`wsss.refine.crf.crf_with_alpha`; ``crf``: its keyword arguments ``t, gauss_sxy,
    gauss_compat, bi_sxy, bi_srgb, bi_compat``, unset keys keep the PSA CRF values)."""

    SECTION = "affinitynet.label"
    low_alpha: float = _default("label", "low_alpha")
    high_alpha: float = _default("label", "high_alpha")
    crf: Mapping[str, Any] = _default("label", "crf")

    def __post_init__(self):
        self._number("low_alpha", 0.0)
        self._number("high_alpha", 0.0)
        if self.low_alpha > self.high_alpha:
            raise ValueError(
                f"affinitynet.label.low_alpha ({self.low_alpha}) must not exceed affinitynet.label.high_alpha ({self.high_alpha})"
            )
        if not isinstance(self.crf, Mapping):
            self._fail("crf", "must be a mapping of CRF keyword arguments")
        unknown = sorted(set(self.crf) - PSA_CRF_KEYS)
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in affinitynet.label.crf; valid keys: {', '.join(sorted(PSA_CRF_KEYS))}"
            )


@dataclass(frozen=True)
class AffinityTrainParams(_Params):
    """``affinitynet.train``: network, training data and optimisation (defaults: ``jiwoon-ahn/psa``
    README and ``train_aff.py``)."""

    SECTION = "affinitynet.train"
    backbone: str = _default("train", "backbone")
    pretrained: str = _default("train", "pretrained")
    trainable_from: Optional[str] = _default("train", "trainable_from")
    taps: Optional[Tuple[str, ...]] = _default("train", "taps")
    radius: int = _default("train", "radius")
    crop_size: int = _default("train", "crop_size")
    hflip: bool = _default("train", "hflip")
    color_jitter: Optional[Tuple[float, float, float, float]] = _default("train", "color_jitter")
    batch_size: int = _default("train", "batch_size")
    epochs: int = _default("train", "epochs")
    optimizer: str = _default("train", "optimizer")
    lr: float = _default("train", "lr")
    head_lr_mult: float = _default("train", "head_lr_mult")
    weight_decay: float = _default("train", "weight_decay")
    momentum_mode: str = _default("train", "momentum_mode")
    momentum: float = _default("train", "momentum")
    poly_power: float = _default("train", "poly_power")
    amp: bool = _default("train", "amp")
    seed: int = _default("train", "seed")
    bg_weight: float = _default("train", "bg_weight")
    fg_weight: float = _default("train", "fg_weight")
    neg_weight: float = _default("train", "neg_weight")
    select: Optional[Mapping[str, Any]] = _default("train", "select")

    def __post_init__(self):
        if not isinstance(self.backbone, str):
            self._fail("backbone", "must be a backbone name")
        if not isinstance(self.pretrained, str):
            self._fail("pretrained", "must be 'none', 'imagenet', 'classifier' or a path")
        if self.trainable_from is not None and not isinstance(self.trainable_from, str):
            self._fail("trainable_from", "must be a stage name or null (the backbone's default)")
        if self.taps is not None and not (
            isinstance(self.taps, tuple) and len(self.taps) >= 1 and all(isinstance(t, str) for t in self.taps)
        ):
            self._fail("taps", "must be a list of backbone tap names or null (automatic)")
        self._integer("radius", 2)
        self._integer("crop_size", 8)
        for k in ("batch_size", "epochs"):
            self._integer(k, 1)
        self._integer("seed", 0)
        for k in (
            "lr",
            "head_lr_mult",
            "weight_decay",
            "momentum",
            "poly_power",
            "bg_weight",
            "fg_weight",
            "neg_weight",
        ):
            self._number(k, 0.0)
        if self.momentum_mode not in ("reference", "standard"):
            self._fail("momentum_mode", "must be 'reference' or 'standard'")
        if self.optimizer not in ("sgd", "adamw"):
            self._fail("optimizer", "must be 'sgd' or 'adamw'")
        if self.color_jitter is not None and not (
            isinstance(self.color_jitter, tuple)
            and len(self.color_jitter) == 4
            and all(is_number(v) and v >= 0 for v in self.color_jitter)
        ):
            self._fail("color_jitter", "must be [brightness, contrast, saturation, hue] (>= 0) or null")
        for k in ("hflip", "amp"):
            self._bool(k)
        if self.select is not None:
            sel = self.select
            if not isinstance(sel, Mapping):
                self._fail("select", "must be null or a mapping {from_step, every, split, eval_mode_after}")
            valid = ("from_step", "every", "split", "eval_mode_after")
            unknown = sorted(set(sel) - set(valid))
            missing = [k for k in valid[:3] if k not in sel]
            if unknown or missing:
                raise ValueError(
                    f"affinitynet.train.select: unknown key(s) {unknown}, missing key(s) {missing}; "
                    f"valid keys: {', '.join(valid)} (eval_mode_after optional)"
                )
            for k in ("from_step", "every"):
                v = sel[k]
                if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                    raise ValueError(f"affinitynet.train.select.{k} must be an integer >= 1, got {v!r}")
            if not isinstance(sel["split"], str) or not sel["split"]:
                raise ValueError(f"affinitynet.train.select.split must be a split name, got {sel['split']!r}")
            if not isinstance(sel.get("eval_mode_after", False), bool):
                raise ValueError(
                    f"affinitynet.train.select.eval_mode_after must be true or false, got {sel['eval_mode_after']!r}"
                )

    def evaluation_steps(self, max_step: int) -> Tuple[int, ...]:
        """The update counts (1-based) after which :attr:`select` evaluates the weights, up to
        ``max_step``: the multiples of ``every`` from ``from_step`` on (AEFT: ``global_step % 200 == 0
        and global_step > 1590``); empty without selection."""
        if self.select is None:
            return ()
        every, first = int(self.select["every"]), int(self.select["from_step"])
        return tuple(s for s in range(every, max_step + 1, every) if s >= first)


@dataclass(frozen=True)
class AffinityInferParams(_Params):
    """``affinitynet.infer``: random walk and labels (defaults: ``jiwoon-ahn/psa`` README, ``infer_aff.py``).

    ``crf_t`` = 0 skips the CRF after the walk (PSA, HFPL); AEFT runs the PSA CRF with ``t = 1``
    (``crf``: its pairwise keyword arguments, unset keys keep the PSA CRF values).
    """

    SECTION = "affinitynet.infer"
    alpha: float = _default("infer", "alpha")
    beta: float = _default("infer", "beta")
    logt: int = _default("infer", "logt")
    walk_size: Optional[int] = _default("infer", "walk_size")
    walk: str = _default("infer", "walk")
    crf_t: int = _default("infer", "crf_t")
    crf: Mapping[str, Any] = _default("infer", "crf")

    def __post_init__(self):
        self._number("alpha", 0.0)
        self._number("beta", 0.0, lo_open=True)
        self._integer("logt", 0)
        if self.walk_size is not None:
            self._integer("walk_size", 1)
        self._integer("crf_t", 0)
        if self.walk not in WALKS:
            self._fail("walk", f"must be one of {', '.join(WALKS)}")
        if not isinstance(self.crf, Mapping):
            self._fail("crf", "must be a mapping of CRF keyword arguments")
        valid = PSA_CRF_KEYS - {"t"}
        unknown = sorted(set(self.crf) - valid)
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in affinitynet.infer.crf; valid keys: {', '.join(sorted(valid))}"
            )

    def steps_exponent(self, map_size: Tuple[int, int]) -> int:
        """The walk's exponent for a feature map of ``map_size`` (h, w) cells: ``logt`` itself
        (``walk_size`` null, PSA), else ``round(logt + 2 log2(max(h, w) / walk_size))``, at least
        0. ``2^e`` steps spread a score over a distance that grows like ``radius * 2^(e/2)``;
        scaling the steps with the squared map size keeps that reach the same fraction of the image
        as PSA's ``2^8`` steps on a 500-pixel VOC image (63 cells at stride 8)."""
        return scaled_walk_exponent(self.logt, map_size, self.walk_size)


for _sub, _cls in (("label", AffinityLabelParams), ("train", AffinityTrainParams), ("infer", AffinityInferParams)):
    if [f.name for f in dataclasses.fields(_cls)] != list(SCHEMA_DEFAULTS[_sub]):
        raise ImportError(
            f"schema section affinitynet.{_sub} lists {list(SCHEMA_DEFAULTS[_sub])}, but {_cls.__name__} has "
            f"{[f.name for f in dataclasses.fields(_cls)]}: keep them the same keys in the same order"
        )


#: Per-paper settings (docs/affinitynet.md): the ``affinitynet`` config values each official code base
#: runs with. ``psa``: the ``jiwoon-ahn/psa`` README (ResNet-38, alphas 4/16/32, beta 8, t = 256);
#: ``aeft``: ``KAIST-vilab/AEFT`` README ``--low 2 --high 21 --dup 19`` and ``infer_aff.py`` (beta 8,
#: logt 6, PSA CRF t = 1 after the walk; lr 0.01, initialised from the trained CAM network; the
#: weights chosen by ground-truth mIoU on ``train`` every 200 steps from step 1600, dropout off after
#: the first such evaluation);
#: ``hfpl``: ``arvijj/hfpl`` ``run_voc.sh`` (CRF alphas 1/24, walk alpha 6, beta 8, logt 6, no CRF;
#: lr 0.01, ImageNet initialisation).
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "psa": {
        "label": {"low_alpha": 4.0, "high_alpha": 32.0},
        "train": {"lr": 0.1, "pretrained": "imagenet"},
        "infer": {"alpha": 16.0, "beta": 8.0, "logt": 8, "crf_t": 0, "walk_size": None},
    },
    "aeft": {
        "label": {"low_alpha": 2.0, "high_alpha": 21.0},
        "train": {
            "lr": 0.01,
            "pretrained": "classifier",
            "select": {"from_step": 1600, "every": 200, "split": "train", "eval_mode_after": True},
        },
        "infer": {"alpha": 19.0, "beta": 8.0, "logt": 6, "crf_t": 1, "walk_size": None},
    },
    "hfpl": {
        "label": {"low_alpha": 1.0, "high_alpha": 24.0},
        "train": {"lr": 0.01, "pretrained": "imagenet", "seed": 1},
        "infer": {"alpha": 6.0, "beta": 8.0, "logt": 6, "crf_t": 0, "walk_size": None},
    },
}
