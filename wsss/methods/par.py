"""PAR: pixel-adaptive refinement of class maps by local colour affinity (Ru et al., AFA, CVPR 2022),
as used by KTSE to refine its pseudo-labels (``KTSE:networks/PAR.py``; docs/methods/ktse.md).

For every pixel ``i`` the 8 neighbours at each dilation ``d`` in ``dilations`` (default
1, 2, 4, 8, 12, 24: 48 neighbours ``j``; borders replicate-padded) get an affinity

* colour: ``k_ij = -(|I_j - I_i| / (std_j(I) + 1e-8) / w1)^2`` per channel, averaged over
  channels, where ``std_j(I)`` is the (unbiased) standard deviation of the neighbours' values of
  that channel at pixel ``i``; softmax over the neighbours;
* position: ``p_j = -(d_j / (std(d) + 1e-8) / w1)^2`` with ``d_j`` = ``dilation`` for the 4 axis
  neighbours and ``sqrt(2) * dilation`` for the 4 diagonal ones; softmax over the neighbours;

``a_ij = softmax(k)_ij + w2 * softmax(p)_j`` (``w1`` = 0.3, ``w2`` = 0.01). The maps are then
propagated ``num_iter`` (10) times: ``m_i <- sum_j a_ij m_j``. The weights sum to ``1 + w2``, so
the maps grow by that factor per step; only their argmax is used downstream.

Everything runs without gradients in KTSE (pseudo-labels); the functions themselves are plain
differentiable tensor code and do not disable autograd.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

PAR_DILATIONS = (1, 2, 4, 8, 12, 24)
PAR_ITERATIONS = 10

# neighbour offsets (dy, dx) of the 8-neighbourhood, row by row; diagonal ones have distance sqrt(2)
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def dilated_neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """``B x C x H x W`` -> ``B x C x (8 * len(dilations)) x H x W``: the values of the 8 neighbours
    at each dilation (replicate padding), ordered by dilation then by :data:`_OFFSETS`."""
    if x.dim() != 4:
        raise ValueError(f"expected a B x C x H x W tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, [d, d, d, d], mode="replicate")
        for dy, dx in _OFFSETS:
            out.append(padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w])
    return torch.stack(out, dim=2)


def neighbour_distances(dilations: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Spatial distance of each neighbour of :func:`dilated_neighbours` (``8 * len(dilations)``)."""
    base = [math.sqrt(2.0) if dy != 0 and dx != 0 else 1.0 for dy, dx in _OFFSETS]
    return torch.tensor([b * d for d in dilations for b in base], device=device, dtype=dtype)


def par_affinity(
    image: torch.Tensor, dilations: Sequence[int] = PAR_DILATIONS, w1: float = 0.3, w2: float = 0.01
) -> torch.Tensor:
    """Affinities ``B x 1 x K x H x W`` (K = 8 per dilation) of each pixel to its neighbours (module docstring)."""
    nbrs = dilated_neighbours(image, dilations)  # B x 3 x K x H x W
    diff = (nbrs - image.unsqueeze(2)).abs()
    std = nbrs.std(dim=2, keepdim=True)
    colour = (-((diff / (std + 1e-8) / w1) ** 2)).mean(dim=1, keepdim=True)
    dist = neighbour_distances(dilations, device=image.device, dtype=image.dtype)
    pos = -((dist / (dist.std() + 1e-8) / w1) ** 2)
    pos = F.softmax(pos, dim=0).view(1, 1, -1, 1, 1)
    return F.softmax(colour, dim=2) + w2 * pos


def par_refine(
    image: torch.Tensor,
    masks: torch.Tensor,
    dilations: Sequence[int] = PAR_DILATIONS,
    num_iter: int = PAR_ITERATIONS,
    w1: float = 0.3,
    w2: float = 0.01,
) -> torch.Tensor:
    """Refine ``masks`` (``B x K x h x w``) with the colour affinities of ``image`` (``B x 3 x H x W``).

    ``masks`` are first resized to the image size (bilinear, ``align_corners=True``, as the
    reference does); the result is ``B x K x H x W``. ``num_iter=0`` returns the resized masks.
    """
    if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
        raise ValueError(
            f"image {tuple(image.shape)} and masks {tuple(masks.shape)} must be B x C x H x W with the same B"
        )
    if num_iter < 0:
        raise ValueError(f"num_iter must be >= 0, got {num_iter}")
    dilations = [int(d) for d in dilations]
    if not dilations or any(d < 1 for d in dilations):
        raise ValueError(f"dilations must be positive integers, got {dilations!r}")
    if masks.shape[-2:] != image.shape[-2:]:
        masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
    if num_iter == 0:
        return masks
    aff = par_affinity(image, dilations, w1, w2)
    for _ in range(num_iter):
        masks = (dilated_neighbours(masks, dilations) * aff).sum(dim=2)
    return masks


__all__ = ["PAR_DILATIONS", "PAR_ITERATIONS", "dilated_neighbours", "neighbour_distances", "par_affinity", "par_refine"]
