"""IRN — inter-pixel relation network (Ahn, Cho & Kwak, CVPR 2019) as the affinity refinement of
CAM seeds: IR labels → IRN training → random walk → semantic pseudo-masks (+ confidence masks).

Reference: the official ``jiwoon-ahn/irn`` code (commit ``a2ece003``) and ``KTSE:irn/gen_mask.py``
(docs/official_code.md). The full description, the config keys and every deviation
are in ``docs/irn.md``. Parts:

* :func:`cam_to_ir_label` (``step/cam_to_ir_label.py``): confident foreground / background from
  two CRF-refined thresholds, 255 in between;
* :class:`IRNMethod` (``net/resnet50_irn.py``, ``step/train_irn.py``): frozen ResNet backbone,
  class-boundary branch and displacement branch at stride 4 with GroupNorm, :class:`MeanShift`;
  a :class:`wsss.methods.base.Method` so that :func:`wsss.engine.train` trains it (it is *not*
  registered in the classifier registry);
* :class:`IRNTrainSet` (``VOC12AffinityDataset`` in ``step/train_irn.py``): joint random rescale /
  flip / crop of image and IR label, the label downscaled ×1/4 (nearest), randomness a function
  of (seed, epoch, index);
* :func:`compute_mean_shift` (end of ``step/train_irn.py``): mean displacement over an inference
  list;
* :func:`boundary_map`, :func:`irn_pseudo_label` (``step/make_sem_seg_labels.py``): flip-averaged
  boundary map, random walk (:mod:`wsss.refine.random_walk`), labels and scores;
* stage functions for the workflow: :func:`make_ir_labels`, :func:`train_irn`,
  :func:`make_irn_masks`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..config import config_hash
from ..data.classification import sample_rng
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, random_crop, rescale
from ..engine import discard_checkpoints, load_model_state, save_checkpoint, train, train_config_from
from ..io import DataError, read_label_png, voc_palette, write_label_png
from ..methods.base import Method, StepContext
from ..models.backbones import Backbone, ResNet, build_backbone
from ..workflow.per_image import map_images, todo_ids
from .ir_labels import IGNORE, cam_to_ir_label, ir_label_path, make_ir_labels
from .irn_params import IRLabelParams, IRNInferParams, IRNTrainParams
from .path_index import PathIndex
from .random_walk import STRIDE, confidence_mask, random_walk, sem_seg_from_walk

log = logging.getLogger(__name__)

__all__ = [
    "IRLabelParams",
    "IRNTrainParams",
    "IRNInferParams",
    "cam_to_ir_label",
    "MeanShift",
    "IRNMethod",
    "affinity_labels",
    "pair_displacement",
    "irn_loss_terms",
    "IRNTrainSet",
    "TopLeftCropSet",
    "compute_mean_shift",
    "boundary_map",
    "irn_pseudo_label",
    "load_irn",
    "make_ir_labels",
    "train_irn",
    "make_irn_masks",
]

#: ``1e-5`` of the reference losses (inside the logs and the normalisers).
EPS = 1e-5
_PALETTE = voc_palette()


# ----------------------------------------------------------------------------------------------
# network (net/resnet50_irn.py)
# ----------------------------------------------------------------------------------------------


class MeanShift(nn.Module):
    """Identity in training; subtracts the stored ``running_mean`` (one value per channel) in eval."""

    def __init__(self, channels: int = 2):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        return x - self.running_mean.view(1, -1, 1, 1).to(x.dtype)


def _block(cin: int, cout: int, groups: int, up: int = 1) -> nn.Sequential:
    """1×1 conv (no bias) + GroupNorm (+ bilinear ×``up``) + ReLU; the upsampling sits between GN
    and ReLU as in the reference."""
    layers: List[nn.Module] = [nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(groups, cout)]
    if up > 1:
        layers.append(nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _crop(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return x[..., : size[0], : size[1]]


class IRNMethod(Method):
    """IRN (reference ``net/resnet50_irn.py``): frozen backbone + edge and displacement branches.

    Backbone taps (torchvision ResNet in IRN's stride layout, :class:`wsss.models.backbones.ResNet`):
    stem = conv1+bn1+relu+maxpool (64 ch, stride 4), ``layer1`` (stride 4), ``layer2`` (8),
    ``layer3`` (16), ``layer4`` (16). The backbone runs in eval mode under ``torch.no_grad()``
    (every output detached, BatchNorm fixed, no parameter trains). ``trainable_from`` (not IRN; for
    backbones without ImageNet features) names the first stage that trains with the branches, in a
    ``backbone`` parameter group at lr × 1; BatchNorm stays fixed. Its channel counts come from
    ``tap_channels`` and the upsampling factors from ``tap_strides``, so ``resnet18`` (CPU runs) or
    ``resnet50_os8`` work too. For ResNet-50:

    * edge branch: per tap 1×1 conv → 32 ch + GN(4) + ReLU, ``layer2`` ×2 and ``layer3``/``layer4``
      ×4 (bilinear, between GN and ReLU), cropped to the ``layer1`` size, concatenated (160 ch),
      1×1 conv 160 → 1 with bias = boundary logit;
    * displacement branch: dp1 stem → 64 GN(8); dp2 ``layer1`` → 128 GN(16); dp3 ``layer2`` → 256
      GN(16); dp4 ``layer3`` → 256 GN(16) ×2; dp5 ``layer4`` → 256 GN(16) ×2; dp6 concat(dp3..5) 768
      → 256 GN(16) ×2; dp7 concat(dp1, dp2, dp6) 448 → 256 GN(16) ReLU → 1×1 conv 256 → 2 (no
      bias) → :class:`MeanShift` = displacement (y, x) at stride 4.

    Parameter groups: ``edge`` (``lr × edge_lr_mult``, 1) and ``displacement`` (``lr × dp_lr_mult``,
    10). :meth:`losses` returns the four weighted terms of ``step/train_irn.py`` (see
    :func:`irn_loss_terms`); the engine logs them per step. The unweighted components (``pos_bg``,
    ``pos_fg``, ``pos``, ``neg``, ``dp_fg``, ``dp_bg``) of the last step are kept in
    ``last_components`` and logged at DEBUG level. There is no custom ``train_step``, so the
    engine's DDP mode applies.
    """

    name = "irn"
    EDGE_WIDTH = 32

    def __init__(
        self,
        backbone: Union[str, Backbone] = "resnet50",
        pretrained: Optional[str] = "imagenet",
        radius: int = 10,
        edge_lr_mult: float = 1.0,
        dp_lr_mult: float = 10.0,
        affinity_weight: float = 0.5,
        displacement_weight: float = 0.5,
        trainable_from: Optional[str] = None,
    ):
        super().__init__()
        if isinstance(backbone, str):
            self.backbone_name = backbone
            # "stage4" (the last stage) freezes stages 1-3; layer4 is frozen below unless
            # trainable_from is set: no trainable_from value of the backbone freezes every stage.
            backbone = build_backbone(
                backbone, pretrained=pretrained, freeze_bn=True, trainable_from=trainable_from or "stage4"
            )
        else:
            self.backbone_name = getattr(backbone, "arch", type(backbone).__name__)
        if not isinstance(backbone, ResNet):
            raise TypeError(
                f"IRN needs a ResNet backbone (wsss.models.backbones.ResNet), got {type(backbone).__name__}"
            )
        st = backbone.tap_strides
        if st["stage1"] != STRIDE or st["stage2"] != 2 * STRIDE:
            raise ValueError(f"IRN needs stage strides 4 and 8 for layer1/layer2, got {st}")
        self.backbone = backbone
        self.trainable_from = trainable_from
        if trainable_from is None:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        elif trainable_from not in backbone.stage_names:
            raise ValueError(
                f"IRN: unknown trainable_from {trainable_from!r}; valid values: null, {', '.join(backbone.stage_names)}"
            )
        elif (backbone.trainable_from or backbone.stage_names[0]) != trainable_from:
            raise ValueError(
                f"IRN: trainable_from {trainable_from!r}, but the given backbone trains from "
                f"{backbone.trainable_from or backbone.stage_names[0]!r}; build it with trainable_from={trainable_from!r}"
            )
        self.backbone.eval()

        ch = backbone.tap_channels
        stem = backbone.conv1.out_channels
        ew = self.EDGE_WIDTH
        self.edge1 = _block(stem, ew, 4)
        self.edge2 = _block(ch["stage1"], ew, 4)
        self.edge3 = _block(ch["stage2"], ew, 4, up=st["stage2"] // STRIDE)
        self.edge4 = _block(ch["stage3"], ew, 4, up=st["stage3"] // STRIDE)
        self.edge5 = _block(ch["stage4"], ew, 4, up=st["stage4"] // STRIDE)
        self.edge6 = nn.Conv2d(5 * ew, 1, 1, bias=True)

        self.dp1 = _block(stem, 64, 8)
        self.dp2 = _block(ch["stage1"], 128, 16)
        self.dp3 = _block(ch["stage2"], 256, 16)
        self.dp4 = _block(ch["stage3"], 256, 16, up=st["stage3"] // (2 * STRIDE))
        self.dp5 = _block(ch["stage4"], 256, 16, up=st["stage4"] // (2 * STRIDE))
        self.dp6 = _block(3 * 256, 256, 16, up=2)
        self.dp7 = nn.Sequential(_block(64 + 128 + 256, 256, 16), nn.Conv2d(256, 2, 1, bias=False))
        self.mean_shift = MeanShift(2)

        self.radius = int(radius)
        self.edge_lr_mult = float(edge_lr_mult)
        self.dp_lr_mult = float(dp_lr_mult)
        self.affinity_weight = float(affinity_weight)
        self.displacement_weight = float(displacement_weight)
        self._path_indices: Dict[Tuple[int, int], PathIndex] = {}
        self.last_components: Dict[str, float] = {}

    # -- structure ----------------------------------------------------------------------------
    def edge_modules(self) -> List[nn.Module]:
        return [self.edge1, self.edge2, self.edge3, self.edge4, self.edge5, self.edge6]

    def displacement_modules(self) -> List[nn.Module]:
        return [self.dp1, self.dp2, self.dp3, self.dp4, self.dp5, self.dp6, self.dp7]

    def param_groups(self) -> List[Dict[str, Any]]:
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return ([{"name": "backbone", "params": backbone, "lr_mult": 1.0}] if backbone else []) + [
            {
                "name": "edge",
                "params": [p for m in self.edge_modules() for p in m.parameters()],
                "lr_mult": self.edge_lr_mult,
            },
            {
                "name": "displacement",
                "params": [p for m in self.displacement_modules() for p in m.parameters()],
                "lr_mult": self.dp_lr_mult,
            },
        ]

    def train(self, mode: bool = True) -> "IRNMethod":
        super().train(mode)
        self.backbone.eval()  # frozen: BN statistics never change, whatever the mode
        return self

    def arch(self) -> Dict[str, Any]:
        """What :func:`load_irn` needs to rebuild the network (stored in the model file)."""
        return {
            "backbone": self.backbone_name,
            "radius": self.radius,
            "edge_lr_mult": self.edge_lr_mult,
            "dp_lr_mult": self.dp_lr_mult,
            "affinity_weight": self.affinity_weight,
            "displacement_weight": self.displacement_weight,
            "trainable_from": self.trainable_from,
        }

    # -- forward ------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Backbone taps: stem, layer1, layer2, layer3, layer4 (detached unless their stage trains,
        ``trainable_from``)."""
        bb = self.backbone
        frozen = self.trainable_from is None

        def stage(name: str, fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
            if frozen or bb.is_frozen_stage(name):
                with torch.no_grad():
                    return fn(t).detach()
            return fn(t)

        x1 = stage("stage1", lambda t: bb.maxpool(bb.relu(bb.bn1(bb.conv1(t)))), x)
        x2 = stage("stage1", bb.layer1, x1)
        x3 = stage("stage2", bb.layer2, x2)
        x4 = stage("stage3", bb.layer3, x3)
        x5 = stage("stage4", bb.layer4, x4)
        return [x1, x2, x3, x4, x5]

    def branches(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Boundary logits ``B × 1 × h × w`` and the displacement *before* :class:`MeanShift`
        ``B × 2 × h × w`` (``h, w`` = the stride-4 ``layer1`` size)."""
        x1, x2, x3, x4, x5 = self.features(x)
        e2 = self.edge2(x2)
        size = tuple(e2.shape[-2:])
        edge = torch.cat(
            [self.edge1(x1), e2, _crop(self.edge3(x3), size), _crop(self.edge4(x4), size), _crop(self.edge5(x5), size)],
            dim=1,
        )
        edge = self.edge6(edge)
        d3 = self.dp3(x3)
        s8 = tuple(d3.shape[-2:])
        d6 = self.dp6(torch.cat([d3, _crop(self.dp4(x4), s8), _crop(self.dp5(x5), s8)], dim=1))
        disp = self.dp7(torch.cat([self.dp1(x1), self.dp2(x2), _crop(d6, size)], dim=1))
        return edge, disp

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        edge, disp = self.branches(x)
        return edge, self.mean_shift(disp)

    # -- training -----------------------------------------------------------------------------
    def path_index(self, size: Tuple[int, int]) -> PathIndex:
        size = (int(size[0]), int(size[1]))
        if size not in self._path_indices:
            self._path_indices[size] = PathIndex(self.radius, size)
        return self._path_indices[size]

    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        edge, disp = self(batch["image"])
        label = batch["label"]
        if tuple(label.shape[-2:]) != tuple(edge.shape[-2:]):
            raise ValueError(
                f"IR label crop {tuple(label.shape[-2:])} does not match the stride-{STRIDE} output "
                f"{tuple(edge.shape[-2:])} of a {tuple(batch['image'].shape[-2:])} image crop"
            )
        raw = irn_loss_terms(edge.float(), disp.float(), label, self.path_index(edge.shape[-2:]))
        self.last_components = {k: float(v.detach()) for k, v in raw.items()}
        log.debug("IRN step %s unweighted loss components: %s", getattr(ctx, "step", "?"), self.last_components)
        a, d = self.affinity_weight, self.displacement_weight
        return {"pos": a * raw["pos"], "neg": a * raw["neg"], "dp_fg": d * raw["dp_fg"], "dp_bg": d * raw["dp_bg"]}


# ----------------------------------------------------------------------------------------------
# affinity labels and losses (step/train_irn.py, AffinityDisplacementLoss)
# ----------------------------------------------------------------------------------------------


def affinity_labels(
    label: torch.Tensor, pi: PathIndex, ignore_index: int = IGNORE
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(bg_pos, fg_pos, neg)``, float ``[B, n_dirs, M]`` (``[n_dirs, M]`` for a 2-D label), for
    every source / direction pair of ``pi`` (reference ``GetAffinityLabelFromIndices``): a pair is
    valid when neither end is ``ignore_index``; ``bg_pos`` = valid, equal labels, background;
    ``fg_pos`` = valid, equal labels, foreground; ``neg`` = valid, different labels."""
    label = torch.as_tensor(label)
    squeeze = label.dim() == 2
    if squeeze:
        label = label[None]
    if tuple(label.shape[-2:]) != pi.size:
        raise ValueError(f"label map {tuple(label.shape)} does not match the path index size {pi.size}")
    flat = label.reshape(label.shape[0], -1).long()
    src = flat[:, pi.src_tensor(flat.device)][:, None, :]
    dst = flat[:, pi.dst_tensor(flat.device).reshape(-1)].view(flat.shape[0], pi.num_directions, -1)
    valid = (src != ignore_index) & (dst != ignore_index)
    equal = valid & (src == dst)
    bg_pos = (equal & (src == 0)).float()
    fg_pos = (equal & (src != 0)).float()
    neg = (valid & (src != dst)).float()
    if squeeze:
        return bg_pos[0], fg_pos[0], neg[0]
    return bg_pos, fg_pos, neg


def pair_displacement(disp: torch.Tensor, pi: PathIndex) -> torch.Tensor:
    """``D(source) − D(destination)`` for every pair: ``[B, 2, n_dirs, M]``."""
    flat = disp.reshape(disp.shape[0], disp.shape[1], -1)
    src = flat[:, :, pi.src_tensor(flat.device)][:, :, None, :]
    dst = flat[:, :, pi.dst_tensor(flat.device).reshape(-1)].view(flat.shape[0], flat.shape[1], pi.num_directions, -1)
    return src - dst


def irn_loss_terms(
    edge_logit: torch.Tensor, disp: torch.Tensor, label: torch.Tensor, pi: PathIndex
) -> Dict[str, torch.Tensor]:
    """The unweighted IRN loss terms (reference ``AffinityDisplacementLoss`` + ``train_irn.run``).

    ``edge_logit`` ``B × 1 × h × w``, ``disp`` ``B × 2 × h × w``, ``label`` ``B × h × w`` (IR label
    at stride 4, 255 = ignore). With ``a = edge_to_affinity(sigmoid(edge_logit))``:
    ``pos_bg = Σ bg_pos·(−log(a + ε)) / (Σ bg_pos + ε)``, ``pos_fg`` likewise, ``pos = (pos_bg +
    pos_fg)/2``, ``neg = Σ neg·(−log(1 + ε − a)) / (Σ neg + ε)``; with ``δ = D(s) − D(t)``:
    ``dp_fg = Σ |δ − (dy, dx)|·fg_pos / (2 Σ fg_pos + ε)``, ``dp_bg = Σ |δ|·bg_pos / (2 Σ bg_pos + ε)``
    (sums over the batch and both channels). The reference total is
    ``(pos + neg)/2 + (dp_fg + dp_bg)/2``.
    """
    bg_pos, fg_pos, neg = affinity_labels(label, pi)
    aff = pi.edge_to_affinity(torch.sigmoid(edge_logit))
    pos_elem = -torch.log(aff + EPS)
    neg_elem = -torch.log(1.0 + EPS - aff)
    pos_bg = (bg_pos * pos_elem).sum() / (bg_pos.sum() + EPS)
    pos_fg = (fg_pos * pos_elem).sum() / (fg_pos.sum() + EPS)
    neg_l = (neg * neg_elem).sum() / (neg.sum() + EPS)
    delta = pair_displacement(disp, pi)
    target = torch.as_tensor(pi.directions.T, dtype=delta.dtype, device=delta.device)[None, :, :, None]
    dp_fg = ((delta - target).abs() * fg_pos[:, None]).sum() / (2 * fg_pos.sum() + EPS)
    dp_bg = (delta.abs() * bg_pos[:, None]).sum() / (2 * bg_pos.sum() + EPS)
    return {
        "pos_bg": pos_bg,
        "pos_fg": pos_fg,
        "pos": (pos_bg + pos_fg) / 2,
        "neg": neg_l,
        "dp_fg": dp_fg,
        "dp_bg": dp_bg,
    }


# ----------------------------------------------------------------------------------------------
# data (step/train_irn.py, VOC12AffinityDataset)
# ----------------------------------------------------------------------------------------------


class IRNTrainSet(Dataset):
    """IRN training crops (reference ``VOC12AffinityDataset``); call :meth:`set_epoch` per epoch.

    Per sample, with the RNG of (seed, epoch, index): image and IR label rescaled jointly by a uniform
    factor in ``rescale`` (image PIL bicubic, label nearest; size ``round(h·s), round(w·s)``),
    ImageNet normalisation, joint horizontal flip (p = 0.5), joint random ``crop_size`` crop (image
    padded with 0, label with 255), label downscaled ×1/4 with nearest. Returns ``image``
    (float32 ``3 × crop × crop``), ``label`` (int64 ``crop/4 × crop/4``), ``index``, ``id``.
    """

    def __init__(
        self,
        ds: Any,
        ids: Sequence[str],
        label_dir: Union[str, os.PathLike],
        crop_size: int = 512,
        rescale: Tuple[float, float] = (0.5, 1.5),
        hflip: bool = True,
        seed: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if crop_size % STRIDE:
            raise ValueError(f"crop_size must be a multiple of {STRIDE}, got {crop_size}")
        self.ds, self.ids, self.label_dir = ds, list(ids), Path(label_dir)
        self.crop_size, self.rescale, self.hflip, self.seed = int(crop_size), tuple(rescale), bool(hflip), int(seed)
        self.mean, self.std = tuple(mean), tuple(std)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image_id = self.ids[index]
        img = self.ds.load_image(image_id)
        path = ir_label_path(self.label_dir, image_id)
        label = read_label_png(path)
        if label.shape != img.shape[:2]:
            raise DataError(f"IR label {path} has size {label.shape}, its image {img.shape[:2]}")
        rng = sample_rng(self.seed, self.epoch, index)
        lo, hi = self.rescale
        s = float(rng.uniform(lo, hi))
        img = rescale(img, s, Image.BICUBIC)
        label = rescale(label, s, Image.NEAREST)
        x = normalize(img, self.mean, self.std)
        if self.hflip and rng.random() < 0.5:
            x, label = x[:, ::-1], label[:, ::-1]
        x, label = random_crop([x, label], self.crop_size, rng, pad_values=[0.0, IGNORE])
        label = rescale(label, 1.0 / STRIDE, Image.NEAREST)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
            "label": torch.from_numpy(label.astype(np.int64)),
            "index": index,
            "id": image_id,
        }


class TopLeftCropSet(Dataset):
    """Normalised images placed in the top-left corner of a ``crop_size²`` zero canvas (larger
    images are cut to it): the reference's mean-shift inference data (``crop_method="top_left"``)."""

    def __init__(self, ds: Any, ids: Sequence[str], crop_size: int = 512, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.ds, self.ids, self.crop_size, self.mean, self.std = ds, list(ids), int(crop_size), mean, std

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        x = normalize(self.ds.load_image(self.ids[index]), self.mean, self.std)
        c = self.crop_size
        canvas = np.zeros((c, c, 3), dtype=np.float32)
        h, w = min(c, x.shape[0]), min(c, x.shape[1])
        canvas[:h, :w] = x[:h, :w]
        return {"image": torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))), "id": self.ids[index]}


@torch.no_grad()
def compute_mean_shift(
    method: IRNMethod,
    ds: Any,
    ids: Sequence[str],
    crop_size: int = 512,
    batch_size: int = 32,
    device: Optional[torch.device] = None,
    num_workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Mean displacement over ``ids`` (reference end of ``train_irn``), stored in
    ``method.mean_shift.running_mean`` and returned.

    Per image the raw displacement map (before the mean shift) is averaged over space; the result
    is the average over all images. Deviation (docs/irn.md, "Deviations", item 3): the reference uses
    ``drop_last=True`` with batch 32 and averages batch means, so it ignores the last partial batch
    and crashes (``torch.stack([])``) on a list smaller than one batch; here every image counts
    once, any list size works (identical when the list size is a multiple of the batch size).
    """
    ids = list(ids)
    if not ids:
        raise ValueError("compute_mean_shift needs at least one image id (the mean-shift inference list is empty)")
    device = device or next(method.parameters()).device
    method.to(device).eval()
    loader = DataLoader(
        TopLeftCropSet(ds, ids, crop_size),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
    )
    total = torch.zeros(2, dtype=torch.float64, device=device)
    n = 0
    for batch in tqdm(loader, desc="IRN mean shift", disable=not progress, mininterval=2.0):
        _, disp = method.branches(batch["image"].to(device))
        total += disp.double().mean(dim=(2, 3)).sum(0)
        n += disp.shape[0]
    mean = (total / n).float()
    method.mean_shift.running_mean.copy_(mean)
    return mean.cpu()


# ----------------------------------------------------------------------------------------------
# inference (step/make_sem_seg_labels.py)
# ----------------------------------------------------------------------------------------------


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


@torch.no_grad()
def boundary_map(
    method: IRNMethod, img: np.ndarray, pad_to: int = 512, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Class-boundary probability ``ceil(H/4) × ceil(W/4)`` of one uint8 image (reference
    ``EdgeDisplacement``): the image and its horizontal flip are zero-padded on the right/bottom,
    run as one batch, the logits cropped and averaged over the flip, then ``sigmoid``.

    Padding: to ``max(pad_to, H rounded up to 16) × max(pad_to, W rounded up to 16)``. The
    reference pads to exactly 512 (its crop size), which *crops* images larger than 512 (COCO);
    with ``pad_to = 512`` every image up to 512 is processed exactly as in the reference and larger
    ones are padded to a multiple of 16 instead of being cut.
    """
    device = device or next(method.parameters()).device
    method.eval()
    h, w = img.shape[:2]
    x = _normalised(img)
    edge, _ = method.branches(_padded(torch.stack([x, x.flip(-1)]).to(device), method, pad_to))
    edge = edge[:, 0, : math.ceil(h / STRIDE), : math.ceil(w / STRIDE)].float()
    return torch.sigmoid(edge[0] / 2 + edge[1].flip(-1) / 2)


def _normalised(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(normalize(np.asarray(img)).transpose(2, 0, 1)))


def _padded(batch: torch.Tensor, method: IRNMethod, pad_to: int) -> torch.Tensor:
    """``batch`` zero-padded on the right/bottom to ``max(pad_to, size rounded up to the output
    stride)`` (see :func:`boundary_map`)."""
    h, w = batch.shape[-2:]
    os_ = method.backbone.output_stride
    ph, pw = max(int(pad_to), _round_up(h, os_)), max(int(pad_to), _round_up(w, os_))
    return F.pad(batch, (0, pw - w, 0, ph - h))


@torch.no_grad()
def displacement_field(
    method: IRNMethod, img: np.ndarray, pad_to: int = 512, device: Optional[torch.device] = None
) -> torch.Tensor:
    """The displacement field IRN's reference reads at inference (``EdgeDisplacement``:
    ``dp_out[0]``, the unflipped image; the flip is averaged for the boundary map only): the
    displacement branch in eval mode (mean shift subtracted) on ``img`` padded as
    :func:`boundary_map` pads it, cropped to ``ceil(H/4) x ceil(W/4)``. Returns ``2 x h x w``
    (``y, x``, in stride-4 pixels) on the model's device."""
    device = device or next(method.parameters()).device
    method.eval()
    h, w = img.shape[:2]
    _, disp = method(_padded(_normalised(img)[None].to(device), method, pad_to))
    return disp[0, :, : math.ceil(h / STRIDE), : math.ceil(w / STRIDE)].float()


def irn_pseudo_label(
    method: IRNMethod,
    img: np.ndarray,
    cam: np.ndarray,
    keys: Sequence[int],
    params: Union[IRNInferParams, Mapping[str, Any], None] = None,
    device: Optional[torch.device] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Semantic pseudo-label of one image (reference ``make_sem_seg_labels``): boundary map, random
    walk of ``cam`` (``K × ceil(H/4) × ceil(W/4)``, the stride-4 CAMs), labels and scores (see
    :func:`wsss.refine.random_walk.sem_seg_from_walk`). Returns ``(labels uint8 H × W,
    scores float32 (K+1) × H × W)``."""
    p = IRNInferParams.from_mapping(params)
    h, w = img.shape[:2]
    cam = np.asarray(cam, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    strided = (math.ceil(h / STRIDE), math.ceil(w / STRIDE))
    if cam.ndim != 3 or cam.shape[0] != len(keys) or cam.shape[1:] != strided:
        raise ValueError(
            f"cam must have shape (K={len(keys)}, {strided[0]}, {strided[1]}) for a {h}x{w} image, got {cam.shape}"
        )
    if len(keys) == 0:
        return np.zeros((h, w), np.uint8), np.full((1, h, w), p.bg_thresh, np.float32)
    edge = boundary_map(method, img, p.pad_to, device)
    rw = random_walk(
        torch.from_numpy(cam).to(edge.device), edge, p.radius, p.beta, p.steps_exponent(strided), method=p.walk
    )
    return sem_seg_from_walk(rw, keys, (h, w), p.bg_thresh)


# ----------------------------------------------------------------------------------------------
# model files
# ----------------------------------------------------------------------------------------------


def save_irn(
    path: Union[str, os.PathLike], method: IRNMethod, resolved_config: Mapping[str, Any], **extra: Any
) -> Path:
    """Write the trained IRN (state_dict incl. the mean shift, ``irn_arch``, config) atomically."""
    save_checkpoint(
        Path(path),
        model=method.state_dict(),
        method=method.name,
        irn_arch=method.arch(),
        config=dict(resolved_config),
        config_hash=config_hash(resolved_config),
        **extra,
    )
    return Path(path)


def load_irn(path: Union[str, os.PathLike], device: Optional[torch.device] = None) -> IRNMethod:
    """Rebuild the IRN of a model file written by :func:`train_irn` (eval mode, on ``device``)."""
    state = load_model_state(Path(path))
    if state.get("method") != "irn" or "irn_arch" not in state:
        raise ValueError(f"{path} is not an IRN model file written by train_irn (method {state.get('method')!r})")
    method = IRNMethod(pretrained="none", **state["irn_arch"])
    method.load_state_dict(state["model"])
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return method.to(device).eval()


# ----------------------------------------------------------------------------------------------
# stage functions
# ----------------------------------------------------------------------------------------------


def train_irn(
    ds: Any,
    ids: Sequence[str],
    label_dir: Union[str, os.PathLike],
    model_out: Union[str, os.PathLike],
    work_dir: Union[str, os.PathLike],
    params: Union[IRNTrainParams, Mapping[str, Any], None] = None,
    *,
    infer_ids: Optional[Sequence[str]] = None,
    resolved_config: Optional[Mapping[str, Any]] = None,
    device: Optional[torch.device] = None,
    num_workers: int = 0,
    progress: bool = True,
    stop_after_epochs: Optional[int] = None,
) -> Path:
    """Train IRN on ``ids`` (IR labels ``<label_dir>/<id>.png``) with :func:`wsss.engine.train`,
    compute the mean shift over ``infer_ids`` (reference: ``infer_list``; default ``ids``) and write
    the model file ``model_out`` (atomic; read it with :func:`load_irn`).

    ``work_dir`` holds the engine's resume checkpoint ``last.pt``, ``train_log.csv`` and the
    weights before the mean shift (``trained.pt``); a rerun resumes after the last finished epoch.
    Both weight files are deleted once ``model_out`` is written.
    ``resolved_config`` (default ``{"irn": {"train": params}}``) is what the checkpoint's config hash
    is computed from. ``stop_after_epochs`` ends early (tests) and returns the checkpoint path.
    Under DDP (``torchrun``, see :mod:`wsss.engine`) only rank 0 computes the mean shift and writes
    ``model_out``.
    """
    p = IRNTrainParams.from_mapping(params)
    if p.pretrained == "classifier":
        raise ValueError(
            "irn.train.pretrained 'classifier' names the workflow's classifier model file, which the caller "
            "resolves (wsss.pipeline.irn_backbone_source); pass 'none', 'imagenet' or a state_dict path"
        )
    ids = list(ids)
    missing = [i for i in ids if not ir_label_path(label_dir, i).exists()]
    if missing:
        raise DataError(
            f"{len(missing)} IR label(s) missing in {label_dir}, e.g. {missing[:5]}; run make_ir_labels first"
        )
    if len(ids) < p.batch_size:
        raise ValueError(f"{len(ids)} training images give no full batch of irn.train.batch_size = {p.batch_size}")
    resolved = dict(resolved_config) if resolved_config is not None else {"irn": {"train": dataclasses.asdict(p)}}
    train_set = IRNTrainSet(ds, ids, label_dir, p.crop_size, p.rescale, p.hflip, p.seed)
    torch.manual_seed(p.seed)
    method = IRNMethod(
        p.backbone,
        p.pretrained,
        p.radius,
        p.edge_lr_mult,
        p.dp_lr_mult,
        p.affinity_weight,
        p.displacement_weight,
        trainable_from=p.trainable_from,
    )
    cfg = train_config_from({**dataclasses.asdict(p), "drop_last": True})  # the training keys of the section
    work_dir = Path(work_dir)
    trained = work_dir / "trained.pt"
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
        keep_checkpoint=True,  # until the mean shift is done: a kill during it resumes without retraining
    )
    if Path(out) != trained:
        return Path(out)
    infer_ids = ids if infer_ids is None else list(infer_ids)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    if rank == 0:  # under DDP every process holds the same weights; one computes and writes
        mean = compute_mean_shift(
            method,
            ds,
            infer_ids,
            p.mean_shift_crop_size,
            p.mean_shift_batch_size,
            next(method.parameters()).device,
            num_workers,
            progress,
        )
        log.info("IRN mean shift over %d images: %s", len(infer_ids), mean.tolist())
        save_irn(model_out, method, resolved, mean_shift_images=len(infer_ids))
        discard_checkpoints(work_dir, trained)
    if dist:
        torch.distributed.barrier()
    return Path(model_out)


def make_irn_masks(
    ds: Any,
    store: Any,
    ids: Sequence[str],
    model_path: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    params: Union[IRNInferParams, Mapping[str, Any], None] = None,
    *,
    conf_dir: Optional[Union[str, os.PathLike]] = None,
    device: Optional[torch.device] = None,
    progress: bool = True,
    journal: Any = None,
) -> Dict[str, int]:
    """Semantic pseudo-masks of ``ids`` (palette PNG ``<out_dir>/<id>.png``, label ids, no 255) from
    the stride-4 CAMs of ``store`` (``keys``, ``cam``) and the IRN ``model_path``; with
    ``conf_dir`` also the confidence masks ``<conf_dir>/<id>.png`` (grayscale 0/255, 255 =
    confident; ``irn.infer.confidence_ratio`` of each predicted region). Atomic writes; every id is
    (re)written except those an interrupted attempt of the same job recorded in ``journal``
    (:class:`wsss.workflow.journal.ShardJournal`; None: no resume). Returns
    ``{"written": n, "skipped": m}``.
    """
    p = IRNInferParams.from_mapping(params)
    ids = list(ids)
    missing = [i for i in ids if i not in store]
    if missing:
        raise KeyError(f"{len(missing)} image(s) have no CAM in the store, e.g. {missing[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if conf_dir is not None:
        conf_dir = Path(conf_dir)
        conf_dir.mkdir(parents=True, exist_ok=True)

    def done(i: str) -> bool:
        return (out_dir / f"{i}.png").exists() and (conf_dir is None or (conf_dir / f"{i}.png").exists())

    todo, _ = todo_ids(ids, journal, done)
    if not todo:
        return {"written": 0, "skipped": len(ids)}
    method = load_irn(model_path, device)

    def one(image_id: str) -> None:
        rec = store.get(image_id, fields=("keys", "cam"))
        img = ds.load_image(image_id)
        if tuple(img.shape[:2]) != tuple(rec.size):
            raise DataError(
                f"image {image_id!r} has size {tuple(img.shape[:2])} but its CAM has size {tuple(rec.size)}"
            )
        labels, scores = irn_pseudo_label(method, img, rec.cam, rec.keys, p, device)
        if conf_dir is not None:
            conf = confidence_mask(scores, p.confidence_ratio)
            write_label_png(conf_dir / f"{image_id}.png", conf.astype(np.uint8) * 255)
        write_label_png(out_dir / f"{image_id}.png", labels, _PALETTE)

    return map_images(ids, one, exists=done, journal=journal, desc="IRN masks", progress=progress)
