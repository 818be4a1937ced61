"""IRN random walk and semantic pseudo-labels (Ahn et al. 2019; reference ``indexing.propagate_to_edge``
and ``step/make_sem_seg_labels.py`` of jiwoon-ahn/irn), plus the BECO/KTSE confidence masks
(``KTSE:irn/gen_mask.py``). See docs/irn.md.

The walk, for class maps ``x`` (``K × h × w``, the stride-4 CAMs) and a boundary map ``E`` (``h × w``):

1. ``E`` is padded with 1.0 (certain boundary) by ``radius`` pixels left, right and bottom and a
   :class:`~wsss.refine.path_index.PathIndex` of that size gives the affinities
   ``a(s, d) = 1 − max path boundary`` (radius 5: 34 directions);
2. the affinity matrix ``A`` over the ``N = h·w`` image pixels holds ``a`` symmetrically for every
   pixel pair within the radius (pairs leaving the image are dropped) and 1 on the diagonal;
3. ``T = A^β / colsum(A^β)`` (element-wise power, column-normalised);
4. ``rw = (x ⊙ (1 − E)) · T^(2^exp_times)`` (``exp_times = 8`` → 256 steps).

:func:`random_walk_dense` is the reference formulation: dense ``P × P`` matrix on the padded map,
cropped to ``N × N``, and ``exp_times`` matrix squarings (``16·N³`` FLOPs, ≈ 3 GB for a VOC image).

:func:`random_walk_sparse` computes the same product without any ``N × N`` matrix. ``T`` has at most
``2·n_dirs + 1`` (69 for radius 5) non-zeros per column at *fixed* pixel offsets, so it is stored
as one weight map per offset (``[n_offsets, h, w]``, each already divided by the column sum) and
``x ← x·T`` is a weighted sum of shifted copies of ``x`` (a spatially varying stencil — the
gather/scatter form of a sparse mat-vec), applied ``2^exp_times`` times. Time and memory are
linear in the number of pixels. ``(x·T)·T…`` and ``x·(T²)²…`` are the same product computed in a
different order, so the results differ only by floating-point rounding, not bit for bit. The
sparse walk runs in float64 by default: in float32, 256 steps whose weights sum to 1 only up to
rounding drift by up to ~1e-4 of the maximum, about twice the rounding error of the float32
reference; in float64 it matches the exact product to ~1e-13 (tests: < 1e-4 from the float32
dense walk after normalisation, identical labels).

Semantic labels (:func:`sem_seg_from_walk`): the walk output is upsampled ×4 (bilinear,
``align_corners=False``), cropped to ``H × W``, divided by its **global** maximum (over classes and
pixels), a constant background plane ``bg_thresh`` (0.25) is prepended, argmax, and the channel is
mapped to the label id ``[0] + (keys + 1)``. Background is never propagated.

Documented differences from the reference (none changes a result the reference produces):

* an image without foreground classes (``K = 0``), or whose propagated scores are all zero, gets
  an all-background label (the reference divides by a zero maximum → NaN → label 0 anyway on most
  builds, or crashes for ``K = 0``);
* the sparse walk (floating-point-only difference, see above).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .irn_params import STRIDE, WALKS  # defined with IRN's config parameters (no torch there)
from .path_index import PathIndex

__all__ = [
    "STRIDE",
    "walk_affinities",
    "transition_stencil",
    "random_walk_dense",
    "random_walk_sparse",
    "random_walk",
    "sem_seg_from_walk",
    "confidence_mask",
    "outline_boundary_map",
]


def _check_inputs(
    cam: torch.Tensor, edge: torch.Tensor, radius: int, beta: float, exp_times: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    cam = torch.as_tensor(cam)
    edge = torch.as_tensor(edge)
    if cam.dim() != 3:
        raise ValueError(f"random walk: cam must have shape (K, h, w), got {tuple(cam.shape)}")
    if edge.dim() == 3 and edge.shape[0] == 1:
        edge = edge[0]
    if edge.dim() != 2 or tuple(edge.shape) != tuple(cam.shape[1:]):
        raise ValueError(
            f"random walk: boundary map shape {tuple(edge.shape)} does not match the cam's spatial size "
            f"{tuple(cam.shape[1:])}"
        )
    if isinstance(radius, bool) or int(radius) != radius or radius < 2:
        raise ValueError(f"random walk: radius must be an integer >= 2, got {radius!r}")
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and np.isfinite(beta) and beta > 0):
        raise ValueError(f"random walk: beta must be a finite number > 0, got {beta!r}")
    if isinstance(exp_times, bool) or int(exp_times) != exp_times or exp_times < 0:
        raise ValueError(f"random walk: exp_times must be an integer >= 0, got {exp_times!r}")
    if not torch.is_floating_point(cam):
        cam = cam.float()
    return cam, edge.to(device=cam.device, dtype=cam.dtype)


def walk_affinities(edge: torch.Tensor, radius: int) -> Tuple[PathIndex, torch.Tensor]:
    """Pad ``edge`` (h × w) with 1.0 by ``radius`` left, right and bottom and return the path index
    of the padded size and the affinities ``[n_dirs, M]`` of its sources (reference step 1–2)."""
    h, w = edge.shape
    r = int(radius)
    padded = F.pad(edge[None, None], (r, r, 0, r), mode="constant", value=1.0)[0, 0]
    pi = PathIndex(radius=r, size=(h + r, w + 2 * r))
    return pi, pi.edge_to_affinity(padded)


def random_walk_dense(
    cam: torch.Tensor, edge: torch.Tensor, radius: int = 5, beta: float = 10.0, exp_times: int = 8
) -> torch.Tensor:
    """The reference random walk with a dense ``N × N`` transition matrix (``K × h × w`` out).

    Memory ``O(N²)``, time ``O(exp_times · N³)``: for tests and the benchmark only.
    """
    cam, edge = _check_inputs(cam, edge, radius, beta, exp_times)
    k, h, w = cam.shape
    r = int(radius)
    pi, aff = walk_affinities(edge, r)
    hp, wp = pi.size
    p = hp * wp
    dev = cam.device
    src = pi.src_tensor(dev).expand(pi.num_directions, -1).reshape(-1)
    dst = pi.dst_tensor(dev).reshape(-1)
    vals = aff.reshape(-1)
    dense = torch.zeros(p, p, dtype=cam.dtype, device=dev)
    dense[src, dst] = vals
    dense[dst, src] = vals
    diag = torch.arange(p, device=dev)
    dense[diag, diag] = 1.0
    dense = dense.view(hp, wp, hp, wp)[:h, r : r + w, :h, r : r + w].reshape(h * w, h * w)
    trans = dense.pow(beta)
    del dense
    trans = trans / trans.sum(dim=0, keepdim=True)
    for _ in range(int(exp_times)):
        trans = trans @ trans
    x = (cam * (1.0 - edge)).reshape(k, h * w)
    return (x @ trans).view(k, h, w)


def transition_stencil(
    edge: torch.Tensor, radius: int = 5, beta: float = 10.0
) -> Tuple[List[Tuple[int, int]], torch.Tensor, torch.Tensor]:
    """The column-normalised transition ``T`` as a stencil.

    Returns ``(offsets, weights, self_weight)``: for neighbour ``j`` at offset ``(oy, ox)``,
    ``weights[j, y, x] = T[(y+oy, x+ox) → (y, x)]`` (0 where the neighbour is outside the image),
    and ``self_weight[y, x] = T[(y, x) → (y, x)]``; so one walk step is
    ``x'[y, x] = self_weight·x[y, x] + Σ_j weights[j]·x[y+oy, x+ox]``. ``T`` has the offsets
    ``±d`` for every search direction ``d`` (68 for radius 5).
    """
    h, w = edge.shape
    r = int(radius)
    pi, aff = walk_affinities(edge, r)
    rf = pi.radius_floor
    hs, ws = pi.source_shape
    # sources of the padded map that are image pixels: rows [0, h), padded cols [r, r + w)
    a = aff.view(pi.num_directions, hs, ws)[:, :h, r - rf : r - rf + w].clamp(min=0.0).pow(beta)
    ys = torch.arange(h, device=edge.device)[:, None]
    xs = torch.arange(w, device=edge.device)[None, :]
    fwd = torch.zeros_like(a)  # fwd[d, p] = A^β[p, p + d] (0 if p + d is outside the image)
    for i, (dy, dx) in enumerate(pi.directions.tolist()):
        inside = (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        fwd[i] = torch.where(inside, a[i], torch.zeros((), dtype=a.dtype, device=a.device))
    # backward neighbours: bwd[d, p] = A^β[p, p - d] = fwd[d, p - d]
    bwd = torch.zeros_like(fwd)
    for i, (dy, dx) in enumerate(pi.directions.tolist()):
        bwd[i, dy:, max(dx, 0) : w + min(dx, 0)] = fwd[i, : h - dy, max(-dx, 0) : w - max(dx, 0)]
    colsum = 1.0 + fwd.sum(0) + bwd.sum(0)  # A is symmetric: column sum = row sum; diagonal 1
    dirs = [tuple(d) for d in pi.directions.tolist()]
    offsets = dirs + [(-dy, -dx) for dy, dx in dirs]
    weights = torch.cat([fwd, bwd], 0) / colsum
    return offsets, weights, 1.0 / colsum


@contextlib.contextmanager
def _cpu_threads(n: Optional[int], device: torch.device) -> Iterator[None]:
    """Temporarily set torch's intra-op CPU threads (the walk is many small ops, for which thread
    start-up costs more than it saves, badly so on a loaded machine); ``None`` leaves it alone."""
    if n is None or device.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def random_walk_sparse(
    cam: torch.Tensor,
    edge: torch.Tensor,
    radius: int = 5,
    beta: float = 10.0,
    exp_times: int = 8,
    cpu_threads: Optional[int] = 1,
    dtype: Optional[torch.dtype] = torch.float64,
) -> torch.Tensor:
    """The random walk without a dense matrix: ``2^exp_times`` stencil steps (``K × h × w`` out,
    in the dtype of ``cam``).

    Time ``O(2^exp_times · n_offsets · K · N)``, memory ``O(n_offsets · N)``. ``cpu_threads``: torch
    intra-op threads while walking on the CPU (default 1, see ``bench/random_walk.py``; ``None``
    keeps the current setting). ``dtype``: the precision of the walk (default float64: 256 float32
    steps drift by up to ~1e-4 of the maximum because every step's weights sum to 1 only to float32
    rounding; in float64 the walk matches the exact product to ~1e-13 and costs ~1.5× the time;
    ``None`` = the dtype of ``cam``).
    """
    cam, edge = _check_inputs(cam, edge, radius, beta, exp_times)
    out_dtype = cam.dtype
    if dtype is not None:
        cam, edge = cam.to(dtype), edge.to(dtype)
    k, h, w = cam.shape
    r = int(radius)
    with _cpu_threads(cpu_threads, cam.device):
        offsets, weights, self_w = transition_stencil(edge, r, beta)
        x = cam * (1.0 - edge)
        if k == 0:
            return x.to(out_dtype)
        # the neighbours of pixel p are p + offset with |offset| <= rf < r: pad by r and slice
        views = [(r + oy, r + ox) for oy, ox in offsets]
        for _ in range(2 ** int(exp_times)):
            xp = F.pad(x, (r, r, r, r))
            out = x * self_w
            for j, (y0, x0) in enumerate(views):
                out.addcmul_(weights[j], xp[:, y0 : y0 + h, x0 : x0 + w])
            x = out
    return x.to(out_dtype)


def random_walk(
    cam, edge, radius: int = 5, beta: float = 10.0, exp_times: int = 8, method: str = "sparse", **kw
) -> torch.Tensor:
    """Dispatch to :func:`random_walk_sparse` (default) or :func:`random_walk_dense`."""
    if method == "sparse":
        return random_walk_sparse(cam, edge, radius, beta, exp_times, **kw)
    if method == "dense":
        return random_walk_dense(cam, edge, radius, beta, exp_times)
    raise ValueError(f"unknown random-walk method {method!r}; valid: {', '.join(WALKS)}")


def sem_seg_from_walk(
    rw: torch.Tensor, keys: Sequence[int], size: Tuple[int, int], bg_thresh: float = 0.25
) -> Tuple[np.ndarray, np.ndarray]:
    """Label map and scores from the walk output (reference ``make_sem_seg_labels`` post-processing).

    ``rw``: ``K × h × w`` at stride 4; ``keys``: the K foreground class indices (0-based);
    ``size``: the image ``(H, W)``. Returns ``(labels, scores)``: uint8 ``H × W`` label ids
    (0 = background, ``key + 1`` otherwise) and float32 ``(K+1) × H × W`` scores (channel 0 the
    constant ``bg_thresh``, then the globally max-normalised walk scores).
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    rw = torch.as_tensor(rw).float()
    if rw.dim() != 3 or rw.shape[0] != len(keys):
        raise ValueError(f"walk output must have shape (K={len(keys)}, h, w), got {tuple(rw.shape)}")
    hh, ww = int(size[0]), int(size[1])
    if rw.shape[1] * STRIDE < hh or rw.shape[2] * STRIDE < ww:
        raise ValueError(f"walk output {tuple(rw.shape)} at stride {STRIDE} is smaller than the image size {(hh, ww)}")
    if len(keys):
        up = F.interpolate(rw[None], scale_factor=STRIDE, mode="bilinear", align_corners=False)[0, :, :hh, :ww]
        mx = up.max()
        up = up / mx if mx > 0 else torch.zeros_like(up)
    else:
        up = rw.new_zeros((0, hh, ww))
    scores = torch.cat([up.new_full((1, hh, ww), float(bg_thresh)), up], 0)
    pred = scores.argmax(0).cpu().numpy()
    lut = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return lut[pred], scores.cpu().numpy().astype(np.float32)


def confidence_mask(scores: np.ndarray, ratio: float = 0.5) -> np.ndarray:
    """BECO/KTSE confidence mask (``KTSE:irn/gen_mask.py``; docs/irn.md).

    ``scores``: ``C × H × W`` (C = K+1; the prediction is their argmax). Per pixel the margin is
    top-1 minus top-2 score (top-2 = 0 when C = 1). Inside each predicted region, the
    ``floor(ratio · n)`` pixels with the largest margin are confident (True); ties are broken by
    raster order. Returns a bool ``H × W`` mask.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 3 or scores.shape[0] < 1:
        raise ValueError(f"scores must have shape (C, H, W) with C >= 1, got {scores.shape}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"confidence ratio must lie in [0, 1], got {ratio!r}")
    c = scores.shape[0]
    flat = scores.reshape(c, -1)
    pred = flat.argmax(0)
    if c == 1:
        margin = flat[0]
    else:
        top2 = -np.partition(-flat, 1, axis=0)[:2]
        margin = top2[0] - top2[1]
    conf = np.zeros(flat.shape[1], dtype=bool)
    for label in np.unique(pred):
        idx = np.flatnonzero(pred == label)
        n_conf = int(len(idx) * ratio)
        if n_conf:
            order = np.argsort(-margin[idx], kind="stable")
            conf[idx[order[:n_conf]]] = True
    return conf.reshape(scores.shape[1:])


def outline_boundary_map(gt: np.ndarray, on: float = 0.9, off: float = 0.05) -> torch.Tensor:
    """A boundary map at stride 4 drawn on the ground-truth object outlines: what a well-trained
    boundary network predicts on clean data. For diagnostics and benchmarks only (the walk with the
    true boundaries, ``bench/refinement_order.py``, ``bench/irn_boundary_oracle.py``); nothing in the
    workflow feeds ground truth to the walk.

    ``gt``: ``H × W`` label ids, 255 = ignore (the boundary band counts as outline). A stride-4
    cell is ``on`` when any of its pixels lies on a class change (3 × 3 neighbourhood) or in the
    ignore band, else ``off``. Returns float32 ``ceil(H/4) × ceil(W/4)``."""
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise ValueError(f"gt must be an H x W label map, got shape {gt.shape}")
    lab = torch.from_numpy(np.where(gt == 255, 0, gt).astype(np.float32))[None, None]
    hi = F.max_pool2d(lab, 3, stride=1, padding=1)
    lo = -F.max_pool2d(-lab, 3, stride=1, padding=1)
    edges = (hi != lo)[0, 0].numpy() | (gt == 255)
    h, w = -(-gt.shape[0] // STRIDE), -(-gt.shape[1] // STRIDE)
    pad = np.zeros((h * STRIDE, w * STRIDE), bool)
    pad[: gt.shape[0], : gt.shape[1]] = edges
    strided = pad.reshape(h, STRIDE, w, STRIDE).any(axis=(1, 3))
    return torch.from_numpy(np.where(strided, on, off).astype(np.float32))
