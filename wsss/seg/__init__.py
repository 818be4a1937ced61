"""The fully supervised segmentation stage trained on pseudo-masks (DeepLab; docs/deeplab.md).

Modules: :mod:`.models` (``SEG_MODELS``: ``deeplabv2``, ``deeplabv1``, ``deeplabv3plus``), :mod:`.data`
(training pairs, confidence masks, augmentation), :mod:`.train` (the network as a
:class:`wsss.methods.base.Method` for :func:`wsss.engine.train`), :mod:`.evaluate` (multi-scale
inference, CRF, prediction PNGs), :mod:`.scoring` (metrics of the prediction PNGs; no torch),
:mod:`.params` (the names section ``deeplab:`` accepts) and :mod:`.stages` (the functions the Snakemake rules
call). See docs/deeplab.md.

The names of :mod:`.stages` are imported on first use, so that the torch-free modules
(:mod:`.params`, :mod:`.scoring`) import without torch (the ``data`` conda env has none).
"""

_STAGES = ("evaluate_predictions", "load_seg_method", "predict_shard", "train_segmentation")


def __getattr__(name: str):
    if name in _STAGES:
        from . import stages

        return getattr(stages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "train_segmentation",
    "predict_shard",
    "evaluate_predictions",
    "load_seg_method",
]
