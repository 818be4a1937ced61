"""How many steps a random walk takes on a map of a given size (IRN's and PSA's walks alike).

Kept free of torch and of :mod:`wsss.config` so that both parameter modules
(:mod:`wsss.refine.irn_params`, :mod:`wsss.refine.affinitynet_params`) can use it.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple


def scaled_walk_exponent(exponent: int, map_size: Tuple[int, int], walk_size: Optional[int]) -> int:
    """The walk's exponent ``e`` (``2^e`` steps) for a map of ``map_size`` (h, w) cells:
    ``exponent`` itself when ``walk_size`` is None (the official code), else
    ``round(exponent + 2 log2(max(h, w) / walk_size))``, at least 0. ``2^e`` steps spread a score
    over a distance that grows like ``radius * 2^(e/2)``; scaling the steps with the squared map
    size keeps that reach the same fraction of the image as ``2^exponent`` steps on a map whose
    long side is ``walk_size``."""
    if walk_size is None:
        return int(exponent)
    return max(0, int(round(exponent + 2.0 * math.log2(max(map_size) / float(walk_size)))))
