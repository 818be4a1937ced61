"""Which config keys each stage depends on: its Snakemake ``params`` and the config it records.

A stage's params are exactly the keys its own code reads, plus the data sections
(:data:`wsss.config.DATA_SECTIONS`); what happened upstream reaches it through its input files
(Snakemake reruns a job whose inputs changed). So changing an IRN *inference* setting reruns the
IRN mask shards and what follows, not IRN training, and changing a DeepLab test-time setting reruns
prediction, not training. Scatter counts (``<section>.shards``) are never part of a stage's config:
they decide how many jobs share the work, not what any image's output is, so they stay out of
the config hashes (and of ``masks-<hash>/`` folder names).

==================  =======================================================================
stage               keys (besides the data sections)
==================  =======================================================================
classifier          ``classifier``
cam                 ``classifier``, ``cam``
seed_eval           ``seed_eval``
seed_masks          none (the threshold comes from the sweep CSV, an input)
crf                 ``crf``
eval_masks          none
ir_labels           ``irn.ir_label``
irn_train           ``irn.train``
irn_infer           ``irn.infer``
affinity_labels     ``affinitynet.label``
affinitynet_train   ``affinitynet.train``; also ``affinitynet.infer`` when ``affinitynet.train.select``
                    is set (AEFT's model selection walks with it)
affinitynet_infer   ``affinitynet.infer``
deeplab_train       ``deeplab`` minus test-time and evaluation keys
deeplab_predict     ``deeplab``: the network (model, backbone, model_options) and test-time keys
deeplab_eval        ``deeplab``: pseudo_masks, gallery_images, bound_th
==================  =======================================================================
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from ..config import DATA_SECTIONS

#: Key of a section that only says how many jobs share a stage's work.
SCATTER_KEY = "shards"

#: DeepLab keys that make the network (needed to load a trained model file).
DEEPLAB_NETWORK_KEYS = ("model", "backbone", "model_options")
#: DeepLab keys read only at test time (prediction).
DEEPLAB_TEST_KEYS = ("test_scales", "flip", "fusion", "test_size", "crf", "crf_params", "crf_image")
#: DeepLab keys read only by the evaluation (metrics, gallery).
DEEPLAB_EVAL_KEYS = ("pseudo_masks", "gallery_images", "bound_th")

#: stage -> ((section, sub-keys or None for the whole section minus scatter counts, exclude), ...)
STAGES: Dict[str, Tuple[Tuple[str, Optional[Sequence[str]], Sequence[str]], ...]] = {
    "classifier": (("classifier", None, ()),),
    "cam": (("classifier", None, ()), ("cam", None, ())),
    "seed_eval": (("seed_eval", None, ()),),
    "seed_masks": (),
    "crf": (("crf", None, ()),),
    "eval_masks": (),
    "ir_labels": (("irn", ("ir_label",), ()),),
    "irn_train": (("irn", ("train",), ()),),
    "irn_infer": (("irn", ("infer",), ()),),
    "affinity_labels": (("affinitynet", ("label",), ()),),
    "affinitynet_train": (("affinitynet", ("train",), ()),),
    "affinitynet_infer": (("affinitynet", ("infer",), ()),),
    "deeplab_train": (("deeplab", None, DEEPLAB_TEST_KEYS + ("gallery_images", "bound_th")),),
    "deeplab_predict": (("deeplab", DEEPLAB_NETWORK_KEYS + DEEPLAB_TEST_KEYS, ()),),
    "deeplab_eval": (("deeplab", DEEPLAB_EVAL_KEYS, ()),),
}


def _affinitynet_selects(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("affinitynet", {}).get("train", {}).get("select") is not None


#: stage -> ((predicate of the config, (section, sub-keys, exclude)), ...): keys a stage reads only
#: when a setting asks for them
CONDITIONAL: Dict[str, Tuple[Tuple[Any, Tuple[str, Optional[Sequence[str]], Sequence[str]]], ...]] = {
    "affinitynet_train": ((_affinitynet_selects, ("affinitynet", ("infer",), ())),),
}


def stage_params(cfg: Mapping[str, Any], stage: str) -> Dict[str, Any]:
    """The config subset stage ``stage`` depends on (see the module docstring), deep-copied.

    Works on a full experiment config and on a stage's own params alike (the result of this
    function on either is the same), so stage functions can call it on what the rule passes them.
    """
    try:
        spec = STAGES[stage]
    except KeyError:
        raise KeyError(f"unknown stage {stage!r}; valid stages: {', '.join(sorted(STAGES))}") from None
    out: Dict[str, Any] = {k: copy.deepcopy(cfg[k]) for k in DATA_SECTIONS}
    spec = (*spec, *(entry for applies, entry in CONDITIONAL.get(stage, ()) if applies(cfg)))
    for section, keys, exclude in spec:
        if section not in cfg:
            raise KeyError(f"stage {stage!r} needs config section {section!r}, which the given config lacks")
        sec = cfg[section]
        if keys is None:
            keys = [k for k in sec if k != SCATTER_KEY and k not in exclude]
        missing = [k for k in keys if k not in sec]
        if missing:
            raise KeyError(
                f"stage {stage!r} needs config keys {[f'{section}.{k}' for k in missing]}, which the given config lacks"
            )
        out.setdefault(section, {}).update({k: copy.deepcopy(sec[k]) for k in keys})
    return out
