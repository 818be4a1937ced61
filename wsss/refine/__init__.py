"""Refinement of CAM seeds into pseudo-masks: dense-CRF post-processing (:mod:`wsss.refine.crf`) and the
IRN stages (inter-pixel relation labels, IRN training, random walk)."""
