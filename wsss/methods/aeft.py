"""AEFT: Adversarial Erasing Framework via Triplet on the GPP classifier (Yoon et al., ECCV 2022, §3.4;
official code ``KAIST-vilab/AEFT``, ``models/model_aeft_gpp.py::model_WSSS.update`` and ``train.py``).

Per step, with anchor images ``I_A`` (the batch), labels ``y`` and the GPP network (``gpp.py``):

1. ``L_cls``: binary cross-entropy of the GPP logits; the official code uses only the first 8
   samples (``out[:8]``), also when the batch has 32 (option ``cls_first_n``).
2. From epoch ``T`` (``triplet_start_epoch``, 18) on:

   * positive image (Eq. 6-7): ``A_fg = max_c(max_norm(up(relu(cam))) * y)`` at image size;
     ``I_P = I_A * A_fg * [A_fg < t_H]`` (``mask_mode="soft"``: zero where the CAM is high, scaled
     by the CAM elsewhere; Eq. 7 and the code agree) or ``I_A * [A_fg < t_H]`` (``"hard"``). The
     mask is not detached in the official code (``detach_mask``).
   * attraction (Eq. 9, code): ``L_att = mean|GAP(relu(P^(I_P))) y - GAP(relu(P^(I_A))) y|`` over
     ``B x C`` (L1, both sides trained; the paper writes a squared distance: ``attract_distance``).
     ``attract_mode="rigid"`` replaces it by BCE of the erased image's logits (paper Table 3,
     "Attract (Rigid)").
   * repulsion (Eq. 8, 10, code): each anchor gets a negative image of the batch sharing no class
     (sampled in :meth:`AEFTMethod.losses` from the labels with a generator seeded by the step).
     ``f = P^ / (max_hw |P^| + 1e-5)`` per (image, class); the anchor's low-confidence embedding
     ``e_AL = masked_mean(f, [max_norm(cam) y < t_L]) y`` and the negative's embedding
     ``e_N = masked_mean(f_N, [max_norm(cam_N) y_N < 1.0]) y_N`` (its own labels; the 1.0 mask
     covers essentially the whole map). ``d = ||e_AL - e_N||^2`` (sum over classes); hard triplets
     are those with ``d < M``; if more than 4 exist (``min_hard_triplets`` = 5),
     ``L_rep = mean_hard relu(M - d)``, else 0.
   * ``embedding="cam"`` uses the CAM instead of the GPP map for both terms (Table 2 "Direct").

``L = w_cls L_cls + w_att L_att + w_rep L_rep`` (official weights 1.0 / 0.2 / 0.15; the paper's
text says 0.15 / 0.15). Batch size 8 before ``T`` and the configured batch size (32) from ``T`` on
(:meth:`batch_size_for_epoch`). Deviations from paper and code: docs/methods/aeft.md.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import METHODS, POLY_STEPS, StepContext, early_batch_poly_steps
from .gpp import GPP_BINS, GPPMethod, gap_embedding, max_norm

MASK_MODES = ("soft", "hard")
ATTRACT_MODES = ("soft", "rigid")
EMBEDDINGS = ("gpp", "cam")
DISTANCES = ("l1", "mse")
REPEL_ANCHORS = ("low", "full")


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------


def foreground_map(cam: torch.Tensor, labels: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Eq. 6: ``A_fg = max_c(max_norm(relu(cam)) * y)`` (``B x 1 x H x W``); ``size`` upsamples the
    ReLU'd CAM bilinearly (``align_corners=False``) before normalising, as the official code does."""
    cam = F.relu(cam.float())
    if size is not None and tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return (max_norm(cam) * labels.float()[:, :, None, None]).max(dim=1, keepdim=True).values


def erase_mask(
    cam: torch.Tensor, labels: torch.Tensor, size: Tuple[int, int], threshold: float, mode: str = "soft"
) -> torch.Tensor:
    """The multiplicative erasing mask (``B x 1 x H x W``) of Eq. 7.

    ``soft`` (AEFT paper and code): ``A_fg * [A_fg < threshold]`` — high-CAM pixels are zeroed, the
    rest scaled by their CAM value; differentiable through ``A_fg``. ``hard`` (KTSE):
    ``[A_fg < threshold]`` as a float 0/1 mask, no gradient.
    """
    fg = foreground_map(cam, labels, size)
    keep = fg < threshold
    if mode == "soft":
        return fg * keep
    if mode == "hard":
        return keep.float()
    raise ValueError(f"mask mode must be one of {', '.join(MASK_MODES)}, got {mode!r}")


def attraction_loss(anchor: torch.Tensor, positive: torch.Tensor, distance: str = "l1") -> torch.Tensor:
    """Eq. 9 between ``B x C`` embeddings: mean absolute (``l1``, official code) or mean squared
    (``mse``, the paper's text) difference over all ``B x C`` entries; no stop-gradient."""
    if distance == "l1":
        return (positive - anchor).abs().mean()
    if distance == "mse":
        return ((positive - anchor) ** 2).mean()
    raise ValueError(f"attract distance must be one of {', '.join(DISTANCES)}, got {distance!r}")


def region_embedding(feat: torch.Tensor, region: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 8 with the code's normalisation: ``f = feat / (max_hw |feat| + 1e-5)`` per (image, class),
    then ``sum(region * f) / (sum(region) + 1e-5) * y`` (``B x C``). ``region`` is ``B x C x h x w``."""
    feat = feat.float()
    f = feat / (feat.abs().flatten(2).max(dim=-1).values[..., None, None] + 1e-5)
    region = region.float()
    num = (region * f).flatten(2).sum(-1)
    den = region.flatten(2).sum(-1) + 1e-5
    return num / den * labels.float()


def repulsion_loss(
    anchor: torch.Tensor, negative: torch.Tensor, margin: float = 0.5, min_hard: int = 5
) -> torch.Tensor:
    """Eq. 10 as in the code: ``d_i = ||a_i - n_i||^2`` (sum over classes) for aligned ``N x C`` rows;
    hard triplets ``d_i < margin``; ``mean_hard relu(margin - d_i)`` if at least ``min_hard`` of
    them exist (code: more than 4), else 0 (a zero that keeps the graph)."""
    d = ((anchor - negative) ** 2).sum(dim=1)
    hard = d < margin
    if int(hard.sum()) < max(1, int(min_hard)):
        return d.sum() * 0.0
    return F.relu(margin - d[hard]).mean()


def sample_negatives(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each anchor, a uniformly drawn batch index whose label set is disjoint from the anchor's
    (never itself); ``-1`` where no such image exists. Drawn on the CPU from ``generator``."""
    lab = (labels.detach() > 0.5).float().cpu()
    overlap = (lab @ lab.T) > 0
    valid = ~overlap
    valid.fill_diagonal_(False)
    scores = torch.rand(valid.shape, generator=generator)
    scores[~valid] = -1.0
    best, idx = scores.max(dim=1)
    idx[best < 0] = -1
    return idx


def step_generator(step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that is a function of the step only (reproducible and resumable sampling)."""
    return torch.Generator().manual_seed(int(step) * 7919 + int(salt))


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------


def _choice(name: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")
    return value


@METHODS.register("aeft")
class AEFTMethod(GPPMethod):
    """AEFT on the GPP classifier (module docstring; options and defaults in docs/methods/aeft.md)."""

    name = "aeft"
    #: official ``infer_multi``: raw CAM upsampled to the image size, then ReLU (wsss.cam_infer)
    cam_upsample = "raw_then_relu"

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        bins: Sequence[int] = GPP_BINS,
        aggregation: str = "gated",
        hidden_channels: int = 256,
        head_lr_mult: float = 1.0,
        cls_weight: float = 1.0,
        attract: bool = True,
        repel: bool = True,
        attract_mode: str = "soft",
        embedding: str = "gpp",
        attract_weight: float = 0.2,
        repel_weight: float = 0.15,
        rigid_weight: float = 1.0,
        margin: float = 0.5,
        t_high: float = 0.6,
        t_low: float = 0.2,
        t_neg: float = 1.0,
        mask_mode: str = "soft",
        detach_mask: bool = False,
        attract_distance: str = "l1",
        repel_anchor: str = "low",
        min_hard_triplets: int = 5,
        triplet_start_epoch: int = 18,
        early_batch_size: int = 8,
        poly_steps: str = "reference",
        cls_first_n: int = 8,
    ):
        super().__init__(
            num_classes,
            backbone,
            bins=bins,
            aggregation=aggregation,
            hidden_channels=hidden_channels,
            head_lr_mult=head_lr_mult,
            cls_weight=cls_weight,
        )
        self.attract = bool(attract)
        self.repel = bool(repel)
        self.attract_mode = _choice("attract_mode", attract_mode, ATTRACT_MODES)
        self.embedding = _choice("embedding", embedding, EMBEDDINGS)
        self.mask_mode = _choice("mask_mode", mask_mode, MASK_MODES)
        self.attract_distance = _choice("attract_distance", attract_distance, DISTANCES)
        self.repel_anchor = _choice("repel_anchor", repel_anchor, REPEL_ANCHORS)
        if self.embedding == "gpp" and not self.head.bins:
            raise ValueError("embedding 'gpp' needs a GPP layer; with bins: [] (GAP baseline) use embedding: cam")
        self.attract_weight = float(attract_weight)
        self.repel_weight = float(repel_weight)
        self.rigid_weight = float(rigid_weight)
        self.margin = float(margin)
        self.t_high, self.t_low, self.t_neg = float(t_high), float(t_low), float(t_neg)
        self.detach_mask = bool(detach_mask)
        for key, v in (
            ("min_hard_triplets", min_hard_triplets),
            ("triplet_start_epoch", triplet_start_epoch),
            ("early_batch_size", early_batch_size),
            ("cls_first_n", cls_first_n),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {v!r}")
        self.min_hard_triplets = min_hard_triplets
        self.triplet_start_epoch = triplet_start_epoch
        self.early_batch_size = early_batch_size
        self.cls_first_n = cls_first_n
        self.poly_steps = _choice("poly_steps", poly_steps, POLY_STEPS)

    def schedule_max_step(self, num_images: int, epochs: int) -> Optional[int]:
        """``poly_steps: reference`` (default): the official ``max_step``, which counts every epoch
        at ``early_batch_size`` (:func:`wsss.methods.base.early_batch_poly_steps`)."""
        return early_batch_poly_steps(self.poly_steps, num_images, epochs, self.early_batch_size)

    def batch_size_for_epoch(self, epoch: int, base: int) -> int:
        """Official schedule: ``early_batch_size`` (8) before the triplet epoch ``T``, ``base`` (32) after;
        ``early_batch_size: 0`` keeps ``base`` throughout."""
        if self.early_batch_size > 0 and epoch < self.triplet_start_epoch:
            return self.early_batch_size
        return base

    def _embedding_source(self, out) -> torch.Tensor:
        return out.gpp if self.embedding == "gpp" else out.cam

    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        x, y = batch["image"], batch["label"].float()
        b, _, h, w = x.shape
        out = self.forward_all(x)
        n = self.cls_first_n if self.cls_first_n > 0 else b
        cls = self.classification_loss(out.logits[:n], y[:n])
        terms: Dict[str, torch.Tensor] = {"cls": self.cls_weight * cls}
        zero = cls * 0.0
        active = ctx.epoch >= self.triplet_start_epoch
        src = self._embedding_source(out)

        if self.attract:
            key = "attract" if self.attract_mode == "soft" else "erased_cls"
            terms[key] = zero
            if active:
                mask = erase_mask(out.cam, y, (h, w), self.t_high, self.mask_mode)
                if self.detach_mask:
                    mask = mask.detach()
                out_m = self.forward_all(x * mask.to(x.dtype))
                if self.attract_mode == "soft":
                    anchor = gap_embedding(src.float(), y)
                    positive = gap_embedding(self._embedding_source(out_m).float(), y)
                    terms[key] = self.attract_weight * attraction_loss(anchor, positive, self.attract_distance)
                else:
                    terms[key] = self.rigid_weight * self.classification_loss(out_m.logits, y)

        if self.repel:
            terms["repel"] = zero
            if active:
                neg = sample_negatives(y, step_generator(ctx.step)).to(x.device)
                has_neg = neg >= 0
                if bool(has_neg.any()):
                    cam_n = max_norm(out.cam.float()) * y[:, :, None, None]
                    low = torch.ones_like(cam_n) if self.repel_anchor == "full" else (cam_n < self.t_low).float()
                    anchor_vec = region_embedding(src, low, y)
                    negative_vec = region_embedding(src, (cam_n < self.t_neg).float(), y)
                    rep = repulsion_loss(
                        anchor_vec[has_neg], negative_vec[neg[has_neg]], self.margin, self.min_hard_triplets
                    )
                    terms["repel"] = self.repel_weight * rep
        return terms


__all__ = [
    "AEFTMethod",
    "attraction_loss",
    "erase_mask",
    "foreground_map",
    "region_embedding",
    "repulsion_loss",
    "sample_negatives",
    "step_generator",
]
