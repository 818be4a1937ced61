"""IRN path index (Ahn et al. 2019; reference ``misc/indexing.py::PathIndex``; docs/irn.md).

For a radius ``r`` the *search directions* are the offsets ``(dy, dx)`` of the forward half plane
with ``dy² + dx² < r²``: ``(0, dx)`` for ``dx = 1 .. rf`` and ``(dy, dx)`` for ``dy = 1 .. rf``,
``dx = -rf .. rf``, where ``rf = ceil(r) - 1`` (the *radius floor*). Each unordered pixel pair within
the radius is therefore enumerated once (r = 10: 152 directions; r = 5: 34).

The *path* of a direction is every integer point ``(y, x)`` in the bounding box of ``(0, 0)`` and
``(dy, dx)`` whose squared distance to the line through them, ``(dy·x − dx·y)² / (dy² + dx²)``, is
below 1, ordered by decreasing ``|y| + |x|`` (ties: row-major order of the box), so the first point
is the destination and the last one the source ``(0, 0)``. Paths are grouped by their number of
points (ascending); inside a group directions keep their enumeration order. The destinations in
that group order (``search_dst``) are the canonical order of the directions everywhere else
(affinities, affinity labels, displacement targets).

On a map of size ``(h, w)`` the sources are the pixels ``y ∈ [0, h − rf)``, ``x ∈ [rf, w − rf)``, so
every destination stays inside the map; ``M = (h − rf)(w − 2rf)`` sources, flat index ``y·w + x``.

:meth:`PathIndex.edge_to_affinity` turns a boundary-probability map ``b`` into affinities
``a(s, d) = 1 − max_{p ∈ path(s, d)} b(p)`` (the max includes both ends), shape
``[batch, n_dirs, M]`` — the reference ``edge_to_affinity`` / ``AffinityDisplacementLoss.to_affinity``.

Memory: instead of the reference's per-group int64 index buffers ``[n_paths, path_len, M]``
(≈ 224 MB for r = 10 on 128²), only the per-path flat *offsets* are stored; the full index arrays
are formed one group at a time while computing affinities (:meth:`PathIndex.path_indices` returns
them on request). Results are identical.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

__all__ = ["PathIndex", "search_directions", "direction_path", "radius_floor"]


def radius_floor(radius: float) -> int:
    """``ceil(radius) - 1``: the largest coordinate offset of a search direction."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 1:
        raise ValueError(f"path-index radius must be a finite number > 1, got {radius!r}")
    return int(math.ceil(radius)) - 1


def search_directions(radius: float) -> List[Tuple[int, int]]:
    """The forward-half-plane offsets with squared length ``< radius²``, in enumeration order
    (``(0, 1..rf)`` first, then rows ``dy = 1..rf`` with ``dx = -rf..rf``)."""
    rf = radius_floor(radius)
    r2 = float(radius) ** 2
    dirs = [(0, dx) for dx in range(1, rf + 1) if dx * dx < r2]
    for dy in range(1, rf + 1):
        dirs.extend((dy, dx) for dx in range(-rf, rf + 1) if dy * dy + dx * dx < r2)
    return dirs


def direction_path(dy: int, dx: int) -> np.ndarray:
    """The path points ``[L, 2]`` (y, x) of direction ``(dy, dx)``; first = destination, last = (0, 0)."""
    if dy == 0 and dx == 0:
        raise ValueError("a search direction cannot be (0, 0)")
    ys = np.arange(min(0, dy), max(0, dy) + 1)
    xs = np.arange(min(0, dx), max(0, dx) + 1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()  # row-major order of the bounding box
    dist_sq = (dy * xx - dx * yy) ** 2 / float(dy * dy + dx * dx)
    keep = dist_sq < 1.0
    pts = np.stack([yy[keep], xx[keep]], axis=1)
    order = np.argsort(-(np.abs(pts[:, 0]) + np.abs(pts[:, 1])), kind="stable")
    return pts[order].astype(np.int64)


class PathIndex:
    """Search directions, paths and source/destination indices for radius ``radius`` on an
    ``size = (h, w)`` map (see the module docstring).

    Attributes:
        radius, radius_floor, size
        directions: ``[n_dirs, 2]`` int64 (dy, dx) in canonical (group) order (= ``search_dst``)
        path_groups: list of ``[n_paths, L, 2]`` int64 path points, one per path length (ascending)
        path_lengths: the ``L`` of each group
        src_indices: ``[M]`` int64 flat source indices
        dst_indices: ``[n_dirs, M]`` int64 flat destination indices
        source_shape: ``(h - rf, w - 2 rf)``: the sources form this grid (row-major)
    """

    def __init__(self, radius: float, size: Sequence[int]):
        self.radius = radius
        rf = self.radius_floor = radius_floor(radius)
        if len(size) != 2:
            raise ValueError(f"PathIndex size must be (h, w), got {size!r}")
        h, w = int(size[0]), int(size[1])
        self.size = (h, w)
        hs, ws = h - rf, w - 2 * rf
        if hs <= 0 or ws <= 0:
            raise ValueError(
                f"map of size {h}x{w} is too small for path radius {radius}: it needs height > {rf} and "
                f"width > {2 * rf} (radius floor {rf})"
            )
        self.source_shape = (hs, ws)

        by_length: Dict[int, List[Tuple[Tuple[int, int], np.ndarray]]] = {}
        for d in search_directions(radius):
            path = direction_path(*d)
            by_length.setdefault(len(path), []).append((d, path))
        self.path_lengths = sorted(by_length)
        self.path_groups = [np.stack([p for _, p in by_length[n]]) for n in self.path_lengths]
        self.directions = np.array([d for n in self.path_lengths for d, _ in by_length[n]], dtype=np.int64)

        ys = np.arange(hs, dtype=np.int64)
        xs = np.arange(rf, w - rf, dtype=np.int64)
        self.src_indices = (ys[:, None] * w + xs[None, :]).ravel()
        self.dst_indices = self.src_indices[None, :] + (self.directions[:, 0] * w + self.directions[:, 1])[:, None]
        #: flat offsets (relative to the source) of every path point, per group: [n_paths, L]
        self.group_offsets = [g[..., 0] * w + g[..., 1] for g in self.path_groups]
        self._torch_cache: Dict[Tuple[str, str], List[torch.Tensor]] = {}

    # -- sizes --------------------------------------------------------------------------------
    @property
    def num_directions(self) -> int:
        return len(self.directions)

    @property
    def num_sources(self) -> int:
        return len(self.src_indices)

    @property
    def search_dst(self) -> np.ndarray:
        """The reference's name for :attr:`directions`."""
        return self.directions

    def path_indices(self) -> List[np.ndarray]:
        """Per group, the ``[n_paths, L, M]`` int64 flat indices of every path point of every source."""
        return [off[:, :, None] + self.src_indices[None, None, :] for off in self.group_offsets]

    # -- affinities ---------------------------------------------------------------------------
    def _offsets_on(self, device: torch.device) -> List[torch.Tensor]:
        key = (str(device), "offsets")
        if key not in self._torch_cache:
            self._torch_cache[key] = [torch.as_tensor(o, device=device) for o in self.group_offsets]
            self._torch_cache[(str(device), "src")] = [torch.as_tensor(self.src_indices, device=device)]
        return self._torch_cache[key]

    def src_tensor(self, device: torch.device) -> torch.Tensor:
        self._offsets_on(device)
        return self._torch_cache[(str(device), "src")][0]

    def dst_tensor(self, device: torch.device) -> torch.Tensor:
        key = (str(device), "dst")
        if key not in self._torch_cache:
            self._torch_cache[key] = [torch.as_tensor(self.dst_indices, device=device)]
        return self._torch_cache[key][0]

    def edge_to_affinity(self, boundary: torch.Tensor) -> torch.Tensor:
        """``1 − max`` of the boundary probability along each path.

        ``boundary``: ``[h, w]``, ``[B, h, w]`` or ``[B, 1, h, w]`` (values in [0, 1]) on any device;
        returns ``[n_dirs, M]`` for a 2-D input, else ``[B, n_dirs, M]``. Differentiable (the
        gradient of the max goes to one arg-max point, as in the reference's max pooling).
        """
        boundary = torch.as_tensor(boundary)
        squeeze = boundary.dim() == 2
        if squeeze:
            boundary = boundary[None]
        if boundary.dim() == 4:
            if boundary.shape[1] != 1:
                raise ValueError(f"boundary must have one channel, got shape {tuple(boundary.shape)}")
            boundary = boundary[:, 0]
        if boundary.dim() != 3 or tuple(boundary.shape[-2:]) != self.size:
            raise ValueError(
                f"boundary map of shape {tuple(boundary.shape)} does not match the path index size {self.size}"
            )
        flat = boundary.reshape(boundary.shape[0], -1)
        src = self.src_tensor(boundary.device)
        out = []
        for off in self._offsets_on(boundary.device):
            idx = off[:, :, None] + src[None, None, :]  # [n_paths, L, M]
            vals = flat[:, idx.reshape(-1)].view(flat.shape[0], *idx.shape)
            out.append(1.0 - vals.max(dim=2).values)
        aff = torch.cat(out, dim=1)
        return aff[0] if squeeze else aff

    def __repr__(self) -> str:
        return (
            f"PathIndex(radius={self.radius}, size={self.size}, directions={self.num_directions}, "
            f"sources={self.num_sources}, path_lengths={self.path_lengths})"
        )
