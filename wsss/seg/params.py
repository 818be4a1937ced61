"""Names the segmentation stage (config section ``deeplab:``) accepts, as the schema's enums.

Every key of the section, its type, range and default live in the config schema
(``wsss/schemas/config.schema.yaml``; the defaults are small CPU settings for the synthetic
pipeline); :func:`wsss.config.validate_section` ``("deeplab", params)`` fills and checks a
(partial) section, naming the key. The KTSE/BECO recipe is ``configs/deeplab_beco.yaml``
(``--configfile config.yaml configs/deeplab_beco.yaml``); docs/deeplab.md has the table with both
columns and every deviation. This module imports nothing (the ``data`` conda env has no torch).
"""

from __future__ import annotations

PSEUDO_MASK_SOURCES = ("seeds", "crf", "irn", "affinitynet", "gt")
CE_NORMALISATIONS = ("valid", "all")
FUSIONS = ("mean", "max", "logit_mean")
CRF_IMAGES = ("raw", "parity")
AUGMENTS = ("resized_crop", "scale_crop")
PARAM_GROUPS = ("standard", "seam")
