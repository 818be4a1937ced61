"""The fully supervised segmentation stage trained on pseudo-masks (DeepLab; docs/deeplab.md).

Modules: :mod:`.models` (``SEG_MODELS``: ``deeplabv2``, ``deeplabv3plus``), :mod:`.data`
(training pairs, confidence masks, augmentation), :mod:`.train` (the network as a
:class:`wsss.methods.base.Method` for :func:`wsss.engine.train`), :mod:`.evaluate` (multi-scale
inference, CRF, prediction PNGs, metrics), :mod:`.params` (config section ``deeplab:``) and
:mod:`.stages` (the functions the Snakemake rules call). See docs/deeplab.md.
"""

from .params import BECO, DEFAULTS, resolve_params
from .stages import evaluate_predictions, load_seg_method, predict_shard, train_segmentation

__all__ = [
    "BECO",
    "DEFAULTS",
    "resolve_params",
    "train_segmentation",
    "predict_shard",
    "evaluate_predictions",
    "load_seg_method",
]
