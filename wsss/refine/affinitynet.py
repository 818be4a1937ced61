"""AffinityNet — the PSA affinity refinement of CAM seeds (Ahn & Kwak, *Learning Pixel-level Semantic
Affinity with Image-level Supervision for Weakly Supervised Semantic Segmentation*, CVPR 2018), as
AEFT (ECCV 2022) and HFPL use it to refine their seeds.

Reference: the official ``jiwoon-ahn/psa`` code (``train_aff.py``, ``infer_aff.py``,
``network/resnet38_aff.py``, ``voc12/data.py::ExtractAffinityLabelInRadius`` / ``VOC12AffDataset``,
``tool/pyutils.py::get_indices_of_pairs``, ``tool/imutils.py``) and the copies in
``KAIST-vilab/AEFT`` (``infer_aff.py``: the CRF after the walk) and ``arvijj/hfpl``
(``train_aff_voc.py``, ``infer_aff_voc.py``). No reference code was copied; the behaviour was
rebuilt from what that code does. The description, the config keys, the per-paper values and
every deviation are in docs/affinitynet.md. Parts:

* training labels: :func:`psa_label` (two CRF label maps → confident foreground from the low-alpha
  CRF, confident background from the high-alpha CRF, 255 elsewhere), :func:`downsample_label` and
  :func:`downsample_scores` (the reference's 8×8 average pooling of the CRF score maps, then
  argmax), :func:`psa_training_label`;
* pairs and loss: :func:`psa_pairs` (pixel pairs within the radius on the feature grid, the
  reference ``get_indices_of_pairs``), :func:`affinity_pair_labels` (``bg``, ``fg``, ``neg``),
  :func:`pair_affinity` (``a_ij = exp(−mean_c |f_i − f_j|)``), :func:`affinity_loss_terms`
  (``train_aff.py``: ``bg/4 + fg/4 + neg/2``, each a mean over its pairs);
* the network :class:`AffinityNetMethod` (``network/resnet38_aff.py``) on any registered backbone,
  a :class:`wsss.methods.base.Method` trained by :func:`wsss.engine.train` (not registered in the
  classifier registry), and its training set :class:`AffinityTrainSet`;
* the random walk (``infer_aff.py``): :func:`psa_cam_scores` (background ``(1 − max fg)^alpha``,
  8×8 average pooling), :func:`random_walk_dense` (the reference ``N × N`` transition matrix,
  squared ``logt`` times) and :func:`random_walk_sparse` (the same ``2^logt`` steps as a stencil,
  linear in the number of pixels), :func:`affinitynet_pseudo_label` (walk, bilinear upsampling,
  optional PSA CRF, argmax);
* stage functions: :func:`make_affinity_labels` (the two CRF label maps per image),
  :func:`train_affinitynet` (:func:`wsss.engine.train`, resumable), :func:`make_affinitynet_masks`,
  and the model file helpers :func:`save_affinitynet` / :func:`load_affinitynet`.

The parameter classes and :data:`PRESETS` live in :mod:`wsss.refine.affinitynet_params` (defaults
read from the config schema), the training labels and :func:`make_affinity_labels` in
:mod:`wsss.refine.affinity_labels` (no torch, for the ``crf`` conda env); both are re-exported here.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..config import config_hash
from ..engine import (
    discard_checkpoints,
    load_model_state,
    save_checkpoint,
    steps_per_epoch,
    train,
    train_config_from,
)
from ..io import DataError, voc_palette, write_label_png, write_text_atomic
from ..methods.base import Method, StepContext
from ..metrics import ConfusionMatrix
from ..models.backbones import Backbone, build_backbone
from ..workflow.per_image import map_images, todo_ids
from .affinity_labels import (
    IGNORE,
    crf_label_pair,
    downsample_label,
    downsample_scores,
    label_pair_paths,
    make_affinity_labels,
    psa_label,
    psa_training_label,
    read_label_pair,
)
from .affinitynet_params import PRESETS, WALKS, AffinityInferParams, AffinityLabelParams, AffinityTrainParams, is_number
from .path_index import radius_floor, search_directions

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE",
    "EPS",
    "PRESETS",
    "AffinityLabelParams",
    "AffinityTrainParams",
    "AffinityInferParams",
    "ModelSelection",
    "psa_label",
    "downsample_scores",
    "downsample_label",
    "psa_training_label",
    "crf_label_pair",
    "PairIndex",
    "psa_pairs",
    "affinity_pair_labels",
    "pair_affinity",
    "affinity_loss_terms",
    "AffinityNetMethod",
    "AffinityTrainSet",
    "psa_cam_scores",
    "dense_affinity_matrix",
    "transition_stencil",
    "random_walk_dense",
    "random_walk_sparse",
    "random_walk",
    "affinitynet_pseudo_label",
    "label_pair_paths",
    "read_label_pair",
    "make_affinity_labels",
    "save_affinitynet",
    "load_affinitynet",
    "train_affinitynet",
    "make_affinitynet_masks",
]

#: ``1e-5`` of ``train_aff.py`` (inside the logs and the pair counts).
EPS = 1e-5
#: The uint8 colour of a zero (= mean) pixel after ImageNet normalisation, de-normalised and cast the
#: way AEFT's ``infer_aff.py`` does it before the CRF: ``uint8(mean · 255)``.
_PAD_COLOUR = (123, 116, 103)
_PALETTE = voc_palette()


# ----------------------------------------------------------------------------------------------
# pixel pairs, pair labels, affinities and the loss (tool/pyutils.py, train_aff.py)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairIndex:
    """Pixel pairs within ``radius`` on an ``size = (h, w)`` grid (reference
    ``get_indices_of_pairs``): ``directions`` ``[D, 2]`` (dy, dx) in the reference order (the
    forward half plane with ``dy² + dx² < r²``: 34 for r = 5), sources ``src`` ``[M]`` = the pixels
    ``y ∈ [0, h − rf)``, ``x ∈ [rf, w − rf)`` (flat ``y·w + x``; ``rf = r − 1``), destinations
    ``dst`` ``[D, M]`` = source + direction. Each unordered pair appears at most once; pixels in the
    bottom ``rf`` rows or the left/right ``rf`` columns are never sources (so pairs among them are
    missing, as in the reference). A grid too small for any source has ``M = 0``."""

    radius: int
    size: Tuple[int, int]
    directions: np.ndarray
    src: np.ndarray
    dst: np.ndarray

    @property
    def radius_floor(self) -> int:
        return radius_floor(self.radius)

    @property
    def source_shape(self) -> Tuple[int, int]:
        rf = self.radius_floor
        return max(self.size[0] - rf, 0), max(self.size[1] - 2 * rf, 0)

    @property
    def num_pairs(self) -> int:
        return int(self.dst.size)

    def tensors(self, device: Union[str, torch.device]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(src, dst)`` as int64 tensors on ``device`` (kept per device: no copy per step)."""
        key = (self.size, self.radius, str(torch.device(device)))
        if key not in _PAIR_TENSORS:
            if len(_PAIR_TENSORS) >= 64:
                _PAIR_TENSORS.clear()
            _PAIR_TENSORS[key] = (torch.as_tensor(self.src, device=device), torch.as_tensor(self.dst, device=device))
        return _PAIR_TENSORS[key]


_PAIR_TENSORS: Dict[Tuple[Tuple[int, int], int, str], Tuple[torch.Tensor, torch.Tensor]] = {}


@functools.lru_cache(maxsize=64)
def psa_pairs(size: Tuple[int, int], radius: int = 5) -> PairIndex:
    """The :class:`PairIndex` of an ``(h, w)`` grid (cached)."""
    h, w = int(size[0]), int(size[1])
    rf = radius_floor(radius)
    dirs = np.array(search_directions(radius), dtype=np.int64).reshape(-1, 2)
    hs, ws = max(h - rf, 0), max(w - 2 * rf, 0)
    ys = np.arange(hs, dtype=np.int64)
    xs = np.arange(rf, rf + ws, dtype=np.int64)
    src = (ys[:, None] * w + xs[None, :]).ravel()
    dst = src[None, :] + (dirs[:, 0] * w + dirs[:, 1])[:, None]
    return PairIndex(int(radius), (h, w), dirs, src, dst)


def affinity_pair_labels(
    label: Any, pairs: PairIndex, ignore_index: int = IGNORE
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(bg, fg, neg)`` float ``[B, D, M]`` (``[D, M]`` for a 2-D label) of every pair of ``pairs``
    (reference ``ExtractAffinityLabelInRadius``): ``bg`` = both ends background (0); ``fg`` = both
    ends the same foreground label, neither 255; ``neg`` = different labels, neither 255. Pairs with
    an ignored end are in none of the three."""
    label = torch.as_tensor(label)
    squeeze = label.dim() == 2
    if squeeze:
        label = label[None]
    if tuple(label.shape[-2:]) != tuple(pairs.size):
        raise ValueError(f"label map {tuple(label.shape)} does not match the pair grid {pairs.size}")
    flat = label.reshape(label.shape[0], -1).long()
    src_i, dst_i = pairs.tensors(flat.device)
    src = flat[:, src_i][:, None, :]
    dst = flat[:, dst_i.reshape(-1)].view(flat.shape[0], *dst_i.shape)
    valid = (src != ignore_index) & (dst != ignore_index)
    pos = src == dst
    bg = (pos & (src == 0)).float()
    fg = (pos & (src != 0) & valid).float()
    neg = (~pos & valid).float()
    if squeeze:
        return bg[0], fg[0], neg[0]
    return bg, fg, neg


def pair_affinity(feat: torch.Tensor, pairs: PairIndex) -> torch.Tensor:
    """``a_ij = exp(−mean_c |f_i − f_j|)`` for every pair (reference ``resnet38_aff.Net.forward``):
    ``feat`` ``B × C × h × w`` → ``[B, D, M]`` (computed one direction at a time to bound memory)."""
    if tuple(feat.shape[-2:]) != tuple(pairs.size):
        raise ValueError(f"feature map {tuple(feat.shape)} does not match the pair grid {pairs.size}")
    flat = feat.reshape(feat.shape[0], feat.shape[1], -1)
    src_i, dst_i = pairs.tensors(feat.device)
    ff = flat[:, :, src_i]
    out = [torch.exp(-(flat[:, :, dst_i[d]] - ff).abs().mean(dim=1)) for d in range(dst_i.shape[0])]
    if not out:
        return flat.new_zeros((feat.shape[0], 0, pairs.src.size))
    return torch.stack(out, dim=1)


def affinity_loss_terms(
    aff: torch.Tensor, bg: torch.Tensor, fg: torch.Tensor, neg: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """The unweighted PSA loss terms (``train_aff.py``), sums over the whole batch:
    ``bg = Σ bg·(−log(a + ε)) / (Σ bg + ε)``, ``fg`` likewise, ``neg = Σ neg·(−log(1 + ε − a)) /
    (Σ neg + ε)``, ``ε = 1e-5``. The reference total is ``bg/4 + fg/4 + neg/2``."""
    aff = aff.float()
    pos_elem = -torch.log(aff + EPS)
    neg_elem = -torch.log(1.0 + EPS - aff)
    return {
        "bg": (bg * pos_elem).sum() / (bg.sum() + EPS),
        "fg": (fg * pos_elem).sum() / (fg.sum() + EPS),
        "neg": (neg * neg_elem).sum() / (neg.sum() + EPS),
    }


# ----------------------------------------------------------------------------------------------
# network (network/resnet38_aff.py)
# ----------------------------------------------------------------------------------------------

#: PSA's taps on ResNet-38 and the widths of their 1×1 reductions (f8_3, f8_4, f8_5).
_PSA_TAPS = ("conv4", "conv5", "conv6")
_PSA_WIDTHS = (64, 128, 256)


class AffinityNetMethod(Method):
    """AffinityNet (reference ``network/resnet38_aff.py::Net``) on any registered backbone.

    Per tap ``i`` a 1×1 conv (no bias, kaiming-normal) to ``widths[i]`` channels + ELU; the maps
    are brought to the size of the first tap (bilinear, ``align_corners=False``, cropped; ResNet-38's
    taps all have stride 8, so nothing is resized there), concatenated (448 ch) and passed through a
    1×1 conv ``448 → 448`` (no bias, xavier-uniform with gain 4) + ELU: the affinity features. The
    affinity of a pixel pair within ``radius`` (5) is ``exp(−mean_c |f_i − f_j|)``.

    Taps: ``conv4, conv5, conv6`` on ResNet-38 (PSA); on other backbones by default the last three
    taps before ``out`` (``stage2, stage3, stage4`` on the ResNets, a stride-8 grid). The backbone
    keeps its BatchNorm frozen; ``trainable_from`` ``None`` keeps the backbone's default (``b3`` on
    ResNet-38 = PSA's ``not_training`` conv1a, b2, b2_1, b2_2). Parameter groups: ``backbone``
    (lr × 1) and ``head`` (lr × ``head_lr_mult`` = 10, PSA's ``from_scratch_layers``). :meth:`losses`
    returns the weighted terms ``bg``, ``fg``, ``neg`` (``bg/4 + fg/4 + neg/2``); the unweighted
    ones of the last step are kept in ``last_components``.
    """

    name = "affinitynet"

    def __init__(
        self,
        backbone: Union[str, Backbone] = "resnet38",
        pretrained: Optional[str] = "none",
        trainable_from: Optional[str] = None,
        taps: Optional[Sequence[str]] = None,
        widths: Sequence[int] = _PSA_WIDTHS,
        out_channels: Optional[int] = None,
        radius: int = 5,
        head_lr_mult: float = 10.0,
        bg_weight: float = 0.25,
        fg_weight: float = 0.25,
        neg_weight: float = 0.5,
    ):
        super().__init__()
        if isinstance(backbone, str):
            self.backbone_name = backbone
            kw: Dict[str, Any] = {"freeze_bn": True}
            if trainable_from is not None:
                kw["trainable_from"] = trainable_from
            backbone = build_backbone(backbone, pretrained=pretrained, **kw)
        else:
            self.backbone_name = getattr(backbone, "arch", type(backbone).__name__)
        self.backbone = backbone
        self.trainable_from_arg = trainable_from
        names = [n for n in backbone.tap_channels if n != "out"]
        if taps is None:
            taps = _PSA_TAPS if all(t in backbone.tap_channels for t in _PSA_TAPS) else tuple(names[-3:])
        taps = tuple(taps)
        unknown = [t for t in taps if t not in backbone.tap_channels]
        if unknown:
            raise ValueError(
                f"AffinityNet: unknown tap(s) {unknown} for backbone {self.backbone_name!r}; "
                f"valid: {', '.join(backbone.tap_channels)}"
            )
        widths = tuple(int(w) for w in widths)
        if len(widths) != len(taps):
            if len(taps) == len(_PSA_WIDTHS):
                widths = _PSA_WIDTHS
            else:
                raise ValueError(f"AffinityNet: {len(widths)} widths for {len(taps)} taps")
        self.taps, self.widths = taps, widths
        self.reduce = nn.ModuleList(
            [nn.Conv2d(backbone.tap_channels[t], w, 1, bias=False) for t, w in zip(taps, widths)]
        )
        total = sum(widths)
        self.out_channels = int(out_channels or total)
        self.f9 = nn.Conv2d(total, self.out_channels, 1, bias=False)
        for conv in self.reduce:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)
        strides = [backbone.tap_strides[t] for t in taps]
        self.feature_stride = int(strides[0])
        #: input sizes are padded to a multiple of this (PSA: 8) so every tap's grid divides evenly
        self.pad_multiple = int(max(strides))
        self.radius = int(radius)
        self.head_lr_mult = float(head_lr_mult)
        self.loss_weights = {"bg": float(bg_weight), "fg": float(fg_weight), "neg": float(neg_weight)}
        self.last_components: Dict[str, float] = {}
        #: AEFT's quirk (``affinitynet.train.select.eval_mode_after``): once set, :meth:`train` keeps
        #: the network in eval mode (dropout off; BatchNorm is frozen either way)
        self.stay_eval = False
        #: model selection during training (:class:`ModelSelection`); None without it
        self.selection: Optional["ModelSelection"] = None

    def train(self, mode: bool = True) -> "AffinityNetMethod":
        return super().train(mode and not self.stay_eval)

    def extra_state_dict(self) -> Dict[str, Any]:
        """What a resumed training needs besides the weights: the eval-mode quirk's flag and the
        model selection's best weights so far (see :class:`ModelSelection`)."""
        return {"stay_eval": self.stay_eval, "selection": None if self.selection is None else self.selection.state()}

    def load_extra_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        state = state or {}
        self.stay_eval = bool(state.get("stay_eval", False))
        if self.selection is not None:
            self.selection.load_state(state.get("selection"))

    # -- structure ----------------------------------------------------------------------------
    def head_modules(self) -> List[nn.Module]:
        return list(self.reduce) + [self.f9]

    def param_groups(self) -> List[Dict[str, Any]]:
        return [
            {"name": "backbone", "params": [p for p in self.backbone.parameters() if p.requires_grad], "lr_mult": 1.0},
            {
                "name": "head",
                "params": [p for m in self.head_modules() for p in m.parameters()],
                "lr_mult": self.head_lr_mult,
            },
        ]

    def arch(self) -> Dict[str, Any]:
        """What :func:`AffinityNetMethod` needs to be rebuilt (stored in a model file)."""
        return {
            "backbone": self.backbone_name,
            "trainable_from": self.trainable_from_arg,
            "taps": list(self.taps),
            "widths": list(self.widths),
            "out_channels": self.out_channels,
            "radius": self.radius,
            "head_lr_mult": self.head_lr_mult,
            "bg_weight": self.loss_weights["bg"],
            "fg_weight": self.loss_weights["fg"],
            "neg_weight": self.loss_weights["neg"],
        }

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Affinity features ``B × out_channels × h × w`` (``h, w`` = the first tap's grid)."""
        d = self.backbone.forward_dict(x)
        feats = [F.elu(conv(d[t])) for conv, t in zip(self.reduce, self.taps)]
        size = tuple(feats[0].shape[-2:])
        for i in range(1, len(feats)):
            if tuple(feats[i].shape[-2:]) != size:
                f = feats[i]
                scale = self.backbone.tap_strides[self.taps[i]] // self.feature_stride
                f = F.interpolate(f, scale_factor=scale, mode="bilinear", align_corners=False) if scale > 1 else f
                f = f[..., : size[0], : size[1]]
                if tuple(f.shape[-2:]) != size:
                    f = F.pad(f, (0, size[1] - f.shape[-1], 0, size[0] - f.shape[-2]), mode="replicate")
                feats[i] = f
        return F.elu(self.f9(torch.cat(feats, dim=1)))

    def affinities(self, x: torch.Tensor) -> Tuple[torch.Tensor, PairIndex]:
        """``([B, D, M] pair affinities, PairIndex)`` of an image batch."""
        feat = self(x)
        pairs = psa_pairs(tuple(feat.shape[-2:]), self.radius)
        return pair_affinity(feat.float(), pairs), pairs

    # -- training -----------------------------------------------------------------------------
    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        aff, pairs = self.affinities(batch["image"])
        label = batch["label"]
        if tuple(label.shape[-2:]) != pairs.size:
            raise ValueError(
                f"AffinityNet label {tuple(label.shape[-2:])} does not match the feature grid {pairs.size} of a "
                f"{tuple(batch['image'].shape[-2:])} crop"
            )
        raw = affinity_loss_terms(aff, *affinity_pair_labels(label, pairs))
        self.last_components = {k: float(v.detach()) for k, v in raw.items()}
        return {k: self.loss_weights[k] * v for k, v in raw.items()}


class AffinityTrainSet(torch.utils.data.Dataset):
    """AffinityNet training crops (reference ``VOC12AffDataset`` with ``train_aff.py``'s transforms);
    call :meth:`set_epoch` per epoch.

    Per sample, with the RNG of (seed, epoch, index): colour jitter of the image (``color_jitter``
    strengths, always applied as torchvision's ``ColorJitter``; PSA: 0.3, 0.3, 0.3, 0.1), ImageNet
    normalisation, joint horizontal flip, joint random ``crop_size`` crop (image padded with 0, the
    two CRF label maps with 255 = no score), then the PSA label on the feature grid
    (:func:`psa_training_label`, stride ``stride``). No random rescale (PSA has none).
    ``load_pair(image_id)`` returns the ``(la, ha)`` label maps at image resolution. Returns
    ``image`` (float32 ``3 × crop × crop``), ``label`` (int64 ``crop/stride`` square), ``index``, ``id``.
    """

    def __init__(
        self,
        ds: Any,
        ids: Sequence[str],
        load_pair: Callable[[str], Tuple[np.ndarray, np.ndarray]],
        crop_size: int = 448,
        stride: int = 8,
        hflip: bool = True,
        color_jitter: Optional[Sequence[float]] = (0.3, 0.3, 0.3, 0.1),
        seed: int = 0,
    ):
        if crop_size % stride:
            raise ValueError(f"crop_size {crop_size} must be a multiple of the feature stride {stride}")
        self.ds, self.ids, self.load_pair = ds, list(ids), load_pair
        self.crop_size, self.stride, self.hflip, self.seed = int(crop_size), int(stride), bool(hflip), int(seed)
        self.color_jitter = None if color_jitter is None else tuple(color_jitter)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        from ..data.classification import sample_rng
        from ..data.transforms import color_jitter, normalize, random_crop

        image_id = self.ids[index]
        img = self.ds.load_image(image_id)
        la, ha = self.load_pair(image_id)
        if la.shape != img.shape[:2] or ha.shape != img.shape[:2]:
            raise ValueError(f"CRF labels of {image_id!r} have sizes {la.shape}, {ha.shape}; the image {img.shape[:2]}")
        rng = sample_rng(self.seed, self.epoch, index)
        if self.color_jitter is not None and any(self.color_jitter):
            img = color_jitter(img, self.color_jitter, 1.0, rng)
        x = normalize(img)
        if self.hflip and rng.random() < 0.5:
            x, la, ha = x[:, ::-1], la[:, ::-1], ha[:, ::-1]
        x, la, ha = random_crop([x, la, ha], self.crop_size, rng, pad_values=[0.0, IGNORE, IGNORE])
        label = psa_training_label(la, ha, self.stride)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
            "label": torch.from_numpy(label.astype(np.int64)),
            "index": index,
            "id": image_id,
        }


# ----------------------------------------------------------------------------------------------
# random walk (infer_aff.py)
# ----------------------------------------------------------------------------------------------


def psa_cam_scores(
    high_res: Any, alpha: float, stride: int = 8, padded_size: Optional[Tuple[int, int]] = None
) -> np.ndarray:
    """The walk's input (reference ``infer_aff.py``): background ``(1 − max_k CAM_k)^alpha`` stacked
    before the ``K`` CAMs (``K × H × W`` in [0, 1]) at image resolution, zero-padded at the bottom/right
    to ``padded_size`` (default: a multiple of ``stride``), averaged over ``stride × stride`` blocks.
    Returns float32 ``(K+1) × hp/s × wp/s``. ``K = 0`` gives background 1 (the reference's max over
    all-zero planes)."""
    cams = np.asarray(high_res, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"psa_cam_scores: high_res must have shape (K, H, W), got {cams.shape}")
    k, h, w = cams.shape
    if padded_size is None:
        padded_size = (-(-h // stride) * stride, -(-w // stride) * stride)
    hp, wp = int(padded_size[0]), int(padded_size[1])
    if hp < h or wp < w or hp % stride or wp % stride:
        raise ValueError(f"psa_cam_scores: padded size {(hp, wp)} must hold {(h, w)} and be a multiple of {stride}")
    full = np.zeros((k + 1, hp, wp), np.float32)
    full[1:, :h, :w] = cams
    mx = cams.max(axis=0) if k else np.zeros((h, w), np.float32)
    full[0, :h, :w] = np.power(np.clip(1.0 - mx, 0.0, None), np.float32(alpha))
    return downsample_scores(full, stride)


def _check_walk(
    cam: torch.Tensor, aff: torch.Tensor, pairs: PairIndex, beta: float, logt: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    cam = torch.as_tensor(cam)
    aff = torch.as_tensor(aff)
    if cam.dim() != 3 or tuple(cam.shape[1:]) != tuple(pairs.size):
        raise ValueError(
            f"random walk: cam must have shape (C, {pairs.size[0]}, {pairs.size[1]}), got {tuple(cam.shape)}"
        )
    if aff.dim() == 3 and aff.shape[0] == 1:
        aff = aff[0]
    if tuple(aff.shape) != tuple(pairs.dst.shape):
        raise ValueError(f"random walk: affinities {tuple(aff.shape)} do not match the pairs {tuple(pairs.dst.shape)}")
    if not (is_number(beta) and beta > 0):
        raise ValueError(f"random walk: beta must be a finite number > 0, got {beta!r}")
    if isinstance(logt, bool) or int(logt) != logt or logt < 0:
        raise ValueError(f"random walk: logt must be an integer >= 0, got {logt!r}")
    if not torch.is_floating_point(cam):
        cam = cam.float()
    return cam, aff.to(device=cam.device, dtype=cam.dtype)


def dense_affinity_matrix(aff: torch.Tensor, pairs: PairIndex) -> torch.Tensor:
    """The reference ``to_dense`` affinity matrix ``N × N``: ``a`` at (source, destination) and its
    transpose, 1 on the diagonal, 0 elsewhere."""
    h, w = pairs.size
    n = h * w
    src_i, dst_i = pairs.tensors(aff.device)
    mat = torch.zeros(n, n, dtype=aff.dtype, device=aff.device)
    src = src_i.expand(dst_i.shape[0], -1).reshape(-1)
    dst = dst_i.reshape(-1)
    vals = aff.reshape(-1)
    mat[src, dst] = vals
    mat[dst, src] = vals
    diag = torch.arange(n, device=aff.device)
    mat[diag, diag] = 1.0
    return mat


def random_walk_dense(
    cam: torch.Tensor, aff: torch.Tensor, pairs: PairIndex, beta: float = 8.0, logt: int = 8
) -> torch.Tensor:
    """The reference walk (``infer_aff.py``): ``A = aff^β`` (dense, identity diagonal), ``T = A /
    colsum(A)``, ``T ← T·T`` ``logt`` times (``T^(2^logt)``), ``rw = cam_vec · T``. ``cam``
    ``C × h × w`` → ``C × h × w``. Memory ``O(N²)``, time ``O(logt · N³)``: for tests only."""
    cam, aff = _check_walk(cam, aff, pairs, beta, logt)
    c, h, w = cam.shape
    trans = dense_affinity_matrix(aff, pairs).pow(beta)
    trans = trans / trans.sum(dim=0, keepdim=True)
    for _ in range(int(logt)):
        trans = trans @ trans
    return (cam.reshape(c, h * w) @ trans).view(c, h, w)


def transition_stencil(
    aff: torch.Tensor, pairs: PairIndex, beta: float = 8.0
) -> Tuple[List[Tuple[int, int]], torch.Tensor, torch.Tensor]:
    """The column-normalised transition ``T`` as a stencil: ``(offsets, weights, self_weight)`` with
    ``weights[j, y, x] = T[(y, x) + offsets[j] → (y, x)]`` (0 where that pair does not exist) and
    ``self_weight = T[(y, x) → (y, x)]``; one walk step is ``x'[p] = self_weight[p]·x[p] +
    Σ_j weights[j, p]·x[p + offsets[j]]``. Offsets: ``+d`` for each direction (the pixel as a source)
    and ``−d`` (the pixel as a destination)."""
    h, w = pairs.size
    hs, ws = pairs.source_shape
    rf = pairs.radius_floor
    n_dir = pairs.dst.shape[0]
    a = aff.reshape(n_dir, hs, ws).pow(beta)
    fwd = aff.new_zeros((n_dir, h, w))  # fwd[d, p] = A^β[p, p + d], p a source
    fwd[:, :hs, rf : rf + ws] = a
    bwd = torch.zeros_like(fwd)  # bwd[d, p] = A^β[p − d, p] = fwd[d, p − d]
    dirs = [tuple(int(v) for v in d) for d in pairs.directions]
    for i, (dy, dx) in enumerate(dirs):
        if dy >= h or abs(dx) >= w:
            continue
        bwd[i, dy:, max(dx, 0) : w + min(dx, 0)] = fwd[i, : h - dy, max(-dx, 0) : w - max(dx, 0)]
    colsum = 1.0 + fwd.sum(0) + bwd.sum(0)
    offsets = dirs + [(-dy, -dx) for dy, dx in dirs]
    return offsets, torch.cat([fwd, bwd], 0) / colsum, 1.0 / colsum


def random_walk_sparse(
    cam: torch.Tensor,
    aff: torch.Tensor,
    pairs: PairIndex,
    beta: float = 8.0,
    logt: int = 8,
    dtype: Optional[torch.dtype] = torch.float64,
) -> torch.Tensor:
    """The same walk without any ``N × N`` matrix: ``2^logt`` stencil steps ``x ← x·T``
    (:func:`transition_stencil`), i.e. ``cam · T^(2^logt)`` — the reference squares ``T`` ``logt``
    times, which is the same number of steps. Time ``O(2^logt · D · C · N)``, memory ``O(D · N)``.
    ``dtype``: the walk's precision (default float64; ``None`` = the cam's dtype). Returns the cam's
    dtype."""
    cam, aff = _check_walk(cam, aff, pairs, beta, logt)
    out_dtype = cam.dtype
    if dtype is not None:
        cam, aff = cam.to(dtype), aff.to(dtype)
    c, h, w = cam.shape
    offsets, weights, self_w = transition_stencil(aff, pairs, beta)
    r = pairs.radius_floor
    x = cam
    views = [(r + oy, r + ox) for oy, ox in offsets]
    for _ in range(2 ** int(logt)):
        xp = F.pad(x, (r, r, r, r))
        out = x * self_w
        for j, (y0, x0) in enumerate(views):
            out.addcmul_(weights[j], xp[:, y0 : y0 + h, x0 : x0 + w])
        x = out
    return x.to(out_dtype)


def random_walk(
    cam: torch.Tensor, aff: torch.Tensor, pairs: PairIndex, beta: float = 8.0, logt: int = 8, method: str = "sparse"
) -> torch.Tensor:
    """Dispatch to :func:`random_walk_sparse` (default) or :func:`random_walk_dense`."""
    if method == "sparse":
        return random_walk_sparse(cam, aff, pairs, beta, logt)
    if method == "dense":
        return random_walk_dense(cam, aff, pairs, beta, logt)
    raise ValueError(f"unknown random-walk method {method!r}; valid: {', '.join(WALKS)}")


@torch.no_grad()
def affinitynet_pseudo_label(
    method: AffinityNetMethod,
    img: np.ndarray,
    high_res: np.ndarray,
    keys: Sequence[int],
    params: Union[AffinityInferParams, Mapping[str, Any], None] = None,
    device: Optional[torch.device] = None,
    crf_fn: Optional[Callable[..., np.ndarray]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Pseudo-label of one image (reference ``infer_aff.py``): the image is zero-padded (after
    normalisation) at the bottom/right to a multiple of ``method.pad_multiple`` (PSA: 8), the pair
    affinities of its feature grid and :func:`psa_cam_scores` of ``high_res`` (``K × H × W`` CAMs in
    [0, 1] of the classes ``keys``) are walked (``2^e`` steps,
    :meth:`AffinityInferParams.steps_exponent` of the grid), the result upsampled bilinearly
    (``align_corners=False``) to the padded size; with ``crf_t > 0`` the PSA CRF runs on it (AEFT:
    ``t = 1``, on the padded image whose padding has the mean colour); the argmax, cropped to
    ``H × W``, mapped to label ids ``[0] + (keys + 1)``. Returns ``(labels uint8 H × W, scores
    float32 (K+1) × H × W)``."""
    p = AffinityInferParams.from_mapping(params)
    from ..data.transforms import normalize

    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    h, w = img.shape[:2]
    high_res = np.asarray(high_res, dtype=np.float32)
    if high_res.shape != (len(keys), h, w):
        raise ValueError(f"high_res must have shape (K={len(keys)}, {h}, {w}), got {high_res.shape}")
    device = device or next(method.parameters()).device
    method.eval()
    m = method.pad_multiple
    hp, wp = -(-h // m) * m, -(-w // m) * m
    x = torch.from_numpy(np.ascontiguousarray(normalize(np.asarray(img)).transpose(2, 0, 1)))[None]
    x = F.pad(x, (0, wp - w, 0, hp - h)).to(device)
    aff, pairs = method.affinities(x)
    s = method.feature_stride
    if pairs.size != (hp // s, wp // s):
        raise ValueError(f"AffinityNet feature grid {pairs.size} is not the padded size {(hp, wp)} / stride {s}")
    cam = torch.from_numpy(psa_cam_scores(high_res, p.alpha, s, (hp, wp))).to(device)
    rw = random_walk(cam, aff[0], pairs, p.beta, p.steps_exponent(pairs.size), method=p.walk).float()
    up = F.interpolate(rw[None], size=(hp, wp), mode="bilinear", align_corners=False)[0]
    scores = up.cpu().numpy()
    if p.crf_t > 0 and len(keys):
        if crf_fn is None:
            from .crf import deeplab_crf as crf_fn  # lazy: pydensecrf only for this step
        pairwise = {"gauss_sxy": 3, "gauss_compat": 3, "bi_sxy": 80, "bi_srgb": 13, "bi_compat": 10}
        pairwise.update(dict(p.crf))
        canvas = np.empty((hp, wp, 3), np.uint8)
        canvas[:] = np.asarray(_PAD_COLOUR, np.uint8)
        canvas[:h, :w] = img
        scores = np.asarray(
            crf_fn(
                canvas,
                np.ascontiguousarray(scores, dtype=np.float32),
                t=p.crf_t,
                pos_w=pairwise["gauss_compat"],
                pos_xy_std=pairwise["gauss_sxy"],
                bi_w=pairwise["bi_compat"],
                bi_xy_std=pairwise["bi_sxy"],
                bi_rgb_std=pairwise["bi_srgb"],
            ),
            np.float32,
        )
    scores = np.ascontiguousarray(scores[:, :h, :w], dtype=np.float32)
    lut = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return lut[scores.argmax(0)], scores


# ----------------------------------------------------------------------------------------------
# model files and stage functions
# ----------------------------------------------------------------------------------------------


class ModelSelection:
    """AEFT's model selection (``KAIST-vilab/AEFT`` ``train_aff.py``; ``affinitynet.train.select``):
    after each update count of :meth:`AffinityTrainParams.evaluation_steps` the current weights make
    the pseudo-labels of ``ids`` (:func:`affinitynet_pseudo_label` with ``infer``, CAMs from
    ``store``), scored by mIoU against ``ds.load_mask``; the best weights (the first of equal
    scores) are kept in memory and in the method's checkpoint state, so a resumed training keeps
    them. With ``eval_mode_after`` the method stays in eval mode after the first evaluation, as in
    AEFT, whose ``infer_aff`` calls ``model.eval()`` and nothing calls ``model.train()`` again. One
    row per evaluation (``step, miou, best_step, best_miou``) goes to ``log_path`` (a rerun from a
    checkpoint rewrites the rows of the steps it repeats). This uses ground-truth masks: a choice
    made with GT, reproduced because the published numbers were made with it."""

    def __init__(
        self,
        method: AffinityNetMethod,
        params: AffinityTrainParams,
        ds: Any,
        store: Any,
        ids: Sequence[str],
        infer: Union[AffinityInferParams, Mapping[str, Any], None],
        log_path: Union[str, os.PathLike],
        max_step: int,
        progress: bool = False,
    ):
        if params.select is None:
            raise ValueError("ModelSelection needs affinitynet.train.select")
        #: the update counts after which the weights are evaluated
        self.steps = params.evaluation_steps(max_step)
        if not self.steps:
            raise ValueError(
                f"affinitynet.train.select evaluates at multiples of every={params.select['every']} from "
                f"from_step={params.select['from_step']}, but training has only {max_step} updates: no weights "
                "would be evaluated; lower from_step or set select: null"
            )
        self.method, self.ds, self.store = method, ds, store
        self.ids = list(ids)
        if not self.ids:
            raise ValueError(f"affinitynet.train.select.split {params.select['split']!r} has no images")
        missing = [i for i in self.ids if i not in store]
        if missing:
            raise KeyError(
                f"{len(missing)} image(s) of the selection split {params.select['split']!r} have no CAM in the store, "
                f"e.g. {missing[:5]}"
            )
        self.infer = AffinityInferParams.from_mapping(infer)
        self.eval_mode_after = bool(params.select.get("eval_mode_after", False))
        self.log_path = Path(log_path)
        self.progress = progress
        self.best_step: Optional[int] = None
        self.best_miou = -math.inf
        self.best_weights: Optional[Dict[str, torch.Tensor]] = None

    def state(self) -> Dict[str, Any]:
        return {"best_step": self.best_step, "best_miou": self.best_miou, "best_weights": self.best_weights}

    def load_state(self, state: Optional[Mapping[str, Any]]) -> None:
        state = state or {}
        self.best_step = state.get("best_step")
        self.best_miou = float(state.get("best_miou", -math.inf))
        self.best_weights = state.get("best_weights")

    @torch.no_grad()
    def miou(self) -> float:
        """mIoU of the current weights' pseudo-labels of the selection images."""
        conf = ConfusionMatrix(self.ds.num_classes)
        device = next(self.method.parameters()).device
        for image_id in tqdm(self.ids, desc="AffinityNet selection", disable=not self.progress, mininterval=2.0):
            rec = self.store.get(image_id, fields=("keys", "high_res"))
            labels, _ = affinitynet_pseudo_label(
                self.method, self.ds.load_image(image_id), rec.high_res, rec.keys, self.infer, device
            )
            conf.update(self.ds.load_mask(image_id), labels)
        return float(conf.miou)

    def __call__(self, step: int) -> None:
        """The engine's ``on_step_end`` hook."""
        if step not in self.steps:
            return
        miou = self.miou()
        if miou > self.best_miou:
            self.best_step, self.best_miou = step, miou
            self.best_weights = {k: v.detach().clone() for k, v in self.method.state_dict().items()}
        if self.eval_mode_after:
            self.method.stay_eval = True
        self.method.train()
        log.info(
            "AffinityNet selection at step %d: mIoU %.4f (best %.4f at step %d)",
            step,
            miou,
            self.best_miou,
            self.best_step,
        )
        rows = []
        if self.log_path.exists():
            with open(self.log_path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) < step]
        rows.append({"step": step, "miou": miou, "best_step": self.best_step, "best_miou": self.best_miou})
        text = io.StringIO()
        writer = csv.DictWriter(text, ["step", "miou", "best_step", "best_miou"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.log_path, text.getvalue())

    def restore_best(self) -> Dict[str, Any]:
        """Load the best weights into the method; ``{"step", "miou"}`` of them."""
        if self.best_weights is None:
            raise RuntimeError(f"the AffinityNet selection has not evaluated any weights yet (steps {self.steps})")
        self.method.load_state_dict(self.best_weights)
        return {"step": int(self.best_step), "miou": float(self.best_miou)}


def _build_method(arch: Mapping[str, Any], pretrained: Optional[str] = "none") -> AffinityNetMethod:
    a = dict(arch)
    taps = a.pop("taps", None)
    return AffinityNetMethod(pretrained=pretrained, taps=None if taps is None else tuple(taps), **a)


def save_affinitynet(
    path: Union[str, os.PathLike], method: AffinityNetMethod, resolved_config: Mapping[str, Any], **extra: Any
) -> Path:
    """Write the trained AffinityNet (state_dict, ``affinitynet_arch``, config and ``extra``
    entries, e.g. ``selection``) atomically."""
    save_checkpoint(
        Path(path),
        model=method.state_dict(),
        method=method.name,
        affinitynet_arch=method.arch(),
        config=dict(resolved_config),
        config_hash=config_hash(resolved_config),
        **extra,
    )
    return Path(path)


def load_affinitynet(path: Union[str, os.PathLike], device: Optional[torch.device] = None) -> AffinityNetMethod:
    """Rebuild the AffinityNet of a model file written by :func:`train_affinitynet` (eval mode)."""
    state = load_model_state(Path(path))
    if state.get("method") != AffinityNetMethod.name or "affinitynet_arch" not in state:
        raise ValueError(
            f"{path} is not an AffinityNet model file written by train_affinitynet (method {state.get('method')!r})"
        )
    method = _build_method(state["affinitynet_arch"])
    method.load_state_dict(state["model"])
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return method.to(device).eval()


def train_affinitynet(
    ds: Any,
    ids: Sequence[str],
    label_dir: Union[str, os.PathLike],
    model_out: Union[str, os.PathLike],
    work_dir: Union[str, os.PathLike],
    params: Union[AffinityTrainParams, Mapping[str, Any], None] = None,
    *,
    resolved_config: Optional[Mapping[str, Any]] = None,
    device: Optional[torch.device] = None,
    num_workers: int = 0,
    progress: bool = True,
    stop_after_epochs: Optional[int] = None,
    select_store: Any = None,
    infer: Union[AffinityInferParams, Mapping[str, Any], None] = None,
) -> Path:
    """Train AffinityNet on ``ids`` (CRF label pairs in ``label_dir``, see :func:`make_affinity_labels`)
    with :func:`wsss.engine.train` (``train_aff.py``: poly schedule, the PolyOptimizer momentum quirk
    by default) and write the model file ``model_out`` (read it with :func:`load_affinitynet`).
    ``params.pretrained`` must already be resolved (``classifier`` is the workflow's name for the
    classifier's model file). ``work_dir`` holds ``last.pt`` and ``train_log.csv`` (terms
    ``loss_bg``, ``loss_fg``, ``loss_neg``, ``loss_total``); a rerun resumes after the last finished
    epoch. ``stop_after_epochs`` ends early (tests) and returns the checkpoint path.

    With ``params.select`` (AEFT's model selection, :class:`ModelSelection`) the images of the split
    ``select.split`` are walked with ``infer`` on their CAMs in ``select_store`` and the weights with
    the best mIoU become the model file (which records ``selection: {step, miou}``); the scores are
    in ``work_dir/selection.csv``."""
    p = AffinityTrainParams.from_mapping(params)
    if p.select is not None and (select_store is None or infer is None):
        raise ValueError(
            "affinitynet.train.select needs the CAM store of the selection split (select_store) and affinitynet.infer"
        )
    if p.pretrained == "classifier":
        raise ValueError("affinitynet.train.pretrained 'classifier' must be replaced by the classifier's model file")
    ids = list(ids)
    missing = [i for i in ids if not all(q.exists() for q in label_pair_paths(label_dir, i))]
    if missing:
        raise DataError(
            f"{len(missing)} AffinityNet label pair(s) missing in {label_dir}, e.g. {missing[:5]}; "
            "run make_affinity_labels first"
        )
    if len(ids) < p.batch_size:
        raise ValueError(
            f"{len(ids)} training images give no full batch of affinitynet.train.batch_size = {p.batch_size}"
        )
    resolved = (
        dict(resolved_config) if resolved_config is not None else {"affinitynet": {"train": dataclasses.asdict(p)}}
    )
    torch.manual_seed(p.seed)
    method = AffinityNetMethod(
        p.backbone,
        p.pretrained,
        p.trainable_from,
        p.taps,
        radius=p.radius,
        head_lr_mult=p.head_lr_mult,
        bg_weight=p.bg_weight,
        fg_weight=p.fg_weight,
        neg_weight=p.neg_weight,
    )
    if p.crop_size % method.pad_multiple:
        raise ValueError(
            f"affinitynet.train.crop_size {p.crop_size} must be a multiple of {method.pad_multiple} for backbone {p.backbone!r}"
        )
    label_dir = Path(label_dir)
    train_set = AffinityTrainSet(
        ds,
        ids,
        functools.partial(read_label_pair, label_dir),
        p.crop_size,
        method.feature_stride,
        p.hflip,
        p.color_jitter,
        p.seed,
    )
    cfg = train_config_from({**dataclasses.asdict(p), "drop_last": True})  # the training keys of the section
    work_dir = Path(work_dir)
    trained = work_dir / "trained.pt"
    max_step = steps_per_epoch(len(ids), p.batch_size, True) * p.epochs  # one process: selection refuses DDP
    if p.select is not None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError("affinitynet.train.select runs in one process; train without torchrun or set select: null")
        method.selection = ModelSelection(
            method,
            p,
            ds,
            select_store,
            [i for i in ds.ids(p.select["split"]) if i not in getattr(select_store, "skipped", ())],
            infer,
            work_dir / "selection.csv",
            max_step,
            progress,
        )
    out = train(
        method,
        train_set,
        cfg,
        trained,
        work_dir,
        resolved_config=resolved,
        device=device,
        num_workers=num_workers,
        stop_after_epochs=stop_after_epochs,
        progress=progress,
        keep_checkpoint=True,
        on_step_end=method.selection,
    )
    if Path(out) != trained:
        return Path(out)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not dist or torch.distributed.get_rank() == 0:
        extra = {}
        if method.selection is not None:
            extra["selection"] = method.selection.restore_best()
            log.info("AffinityNet model: the weights of step %(step)d (selection mIoU %(miou).4f)", extra["selection"])
        save_affinitynet(model_out, method, resolved, **extra)
        discard_checkpoints(work_dir, trained)
    if dist:
        torch.distributed.barrier()
    return Path(model_out)


def make_affinitynet_masks(
    ds: Any,
    store: Any,
    ids: Sequence[str],
    model_path: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    params: Union[AffinityInferParams, Mapping[str, Any], None] = None,
    *,
    device: Optional[torch.device] = None,
    progress: bool = True,
    journal: Any = None,
) -> Dict[str, int]:
    """Pseudo-masks of ``ids`` (palette PNG ``<out_dir>/<id>.png``, label ids, no 255) from the
    ``keys`` and ``high_res`` CAMs of ``store`` and the AffinityNet ``model_path``
    (:func:`affinitynet_pseudo_label` with ``affinitynet.infer``). Atomic writes; ids an interrupted
    attempt recorded in ``journal`` are skipped. Returns ``{"written": n, "skipped": m}``."""
    p = AffinityInferParams.from_mapping(params)
    ids = list(ids)
    missing = [i for i in ids if i not in store]
    if missing:
        raise KeyError(f"{len(missing)} image(s) have no CAM in the store, e.g. {missing[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def done(i: str) -> bool:
        return (out_dir / f"{i}.png").exists()

    todo, _ = todo_ids(ids, journal, done)
    if not todo:
        return {"written": 0, "skipped": len(ids)}
    method = load_affinitynet(model_path, device)

    def one(image_id: str) -> None:
        rec = store.get(image_id, fields=("keys", "high_res"))
        img = ds.load_image(image_id)
        if tuple(img.shape[:2]) != tuple(rec.size):
            raise DataError(
                f"image {image_id!r} has size {tuple(img.shape[:2])} but its CAM has size {tuple(rec.size)}"
            )
        labels, _ = affinitynet_pseudo_label(method, img, rec.high_res, rec.keys, p, device)
        write_label_png(out_dir / f"{image_id}.png", labels, _PALETTE)

    return map_images(ids, one, exists=done, journal=journal, desc="AffinityNet masks", progress=progress)
