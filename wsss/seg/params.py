"""Settings of the segmentation stage (config section ``deeplab:``): defaults and the BECO recipe.

:data:`DEFAULTS` are small CPU settings (the synthetic pipeline); :data:`BECO` holds the values of
the KTSE/BECO segmentation stage (BECO code in ``KTSE:segmentation/``, ``main.py``) where this stage
implements them. docs/deeplab.md has the table with both columns and every deviation.
:func:`resolve_params` fills missing keys from :data:`DEFAULTS` and checks values, naming the key.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

#: Small CPU defaults (synthetic data, tests).
DEFAULTS: Dict[str, Any] = {
    # network
    "model": "deeplabv2",
    "backbone": "resnet18_os8",
    "pretrained": "none",
    "freeze_bn": False,
    "model_options": {},
    # training targets
    "pseudo_masks": "irn",  # seeds | crf | irn | gt (the Snakefile picks the folder; gt = upper bound)
    "use_confidence": False,
    "ce_normalisation": "all",
    # optimisation (engine TrainConfig; momentum_mode is always 'standard' here)
    "epochs": 6,
    "batch_size": 8,
    "lr": 0.01,
    "head_lr_mult": 1.0,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "poly_power": 0.9,
    "amp": True,
    "seed": 0,
    # augmentation
    "augment": "resized_crop",
    "crop_size": 96,
    "scale_range": [0.5, 0.75],
    "ratio_range": [0.75, 1.3333333333333333],
    "hflip": True,
    # inference / evaluation
    "test_scales": [1.0],
    "flip": True,
    "fusion": "mean",
    "test_size": None,
    "crf": False,
    "crf_params": {},
    "crf_image": "raw",
    "shards": 2,
    "gallery_images": 8,
    "bound_th": 0.008,
}

#: The KTSE/BECO values (GPU). Keys not listed keep :data:`DEFAULTS`.
BECO: Dict[str, Any] = {
    **DEFAULTS,
    "model": "deeplabv2",
    "backbone": "resnet101_os8",
    "pretrained": "imagenet_v2",  # torchvision resnet101-cd907fc2.pth
    "freeze_bn": False,
    "pseudo_masks": "irn",
    "use_confidence": True,
    "ce_normalisation": "all",
    "epochs": 100,
    "batch_size": 16,
    "lr": 0.01,
    "head_lr_mult": 1.0,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "poly_power": 0.9,
    "amp": True,
    "seed": 3223,
    "augment": "resized_crop",
    "crop_size": 512,
    "scale_range": [0.5, 0.75],
    "ratio_range": [0.75, 1.3333333333333333],
    "hflip": True,
    "test_scales": [0.75, 1.0, 1.25],
    "flip": False,
    "fusion": "max",
    "test_size": [512, 512],
    "crf": True,
    "crf_params": {},
    "crf_image": "parity",  # BECO's uint8-wrapped mean-subtracted image (test.py quirk)
    "shards": 8,
}

PSEUDO_MASK_SOURCES = ("seeds", "crf", "irn", "gt")
CE_NORMALISATIONS = ("valid", "all")
FUSIONS = ("mean", "max")
CRF_IMAGES = ("raw", "parity")
AUGMENTS = ("resized_crop", "scale_crop")


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"config key 'deeplab.{key}': {msg}")


def resolve_params(params: Mapping[str, Any] | None) -> Dict[str, Any]:
    """``params`` merged onto :data:`DEFAULTS`, with the values checked (errors name the key).

    Keys this stage does not know are kept (the config schema is the place that rejects them).
    """
    p = copy.deepcopy(DEFAULTS)
    p.update(copy.deepcopy(dict(params or {})))
    if p["pseudo_masks"] not in PSEUDO_MASK_SOURCES:
        _fail("pseudo_masks", f"must be one of {PSEUDO_MASK_SOURCES}, got {p['pseudo_masks']!r}")
    if p["ce_normalisation"] not in CE_NORMALISATIONS:
        _fail("ce_normalisation", f"must be one of {CE_NORMALISATIONS}, got {p['ce_normalisation']!r}")
    if p["crf_image"] not in CRF_IMAGES:
        _fail("crf_image", f"must be one of {CRF_IMAGES}, got {p['crf_image']!r}")
    if p["augment"] not in AUGMENTS:
        _fail("augment", f"must be one of {AUGMENTS}, got {p['augment']!r}")
    if p["fusion"] not in FUSIONS:
        _fail("fusion", f"must be one of {FUSIONS}, got {p['fusion']!r}")
    for key in ("epochs", "batch_size", "crop_size", "shards"):
        if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 1:
            _fail(key, f"must be a positive integer, got {p[key]!r}")
    for key in ("lr", "head_lr_mult"):
        if not isinstance(p[key], (int, float)) or p[key] <= 0:
            _fail(key, f"must be a positive number, got {p[key]!r}")
    for key in ("scale_range", "ratio_range"):
        v = p[key]
        if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(x, (int, float)) for x in v):
            _fail(key, f"must be a pair [min, max] of numbers, got {v!r}")
    scales = p["test_scales"]
    if not isinstance(scales, (list, tuple)) or not scales or not all(isinstance(s, (int, float)) and s > 0 for s in scales):
        _fail("test_scales", f"must be a non-empty list of positive numbers, got {scales!r}")
    ts = p["test_size"]
    if ts is not None and (not isinstance(ts, (list, tuple)) or len(ts) != 2 or not all(isinstance(v, int) and v > 0 for v in ts)):
        _fail("test_size", f"must be null or [height, width] in pixels, got {ts!r}")
    for key in ("model_options", "crf_params"):
        if not isinstance(p[key], Mapping):
            _fail(key, f"must be a mapping, got {p[key]!r}")
    return p
