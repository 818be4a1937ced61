"""KTSE: Knowledge Transfer with Simulated inter-image Erasing (Chen et al., ECCV 2024; official code
``NUST-Machine-Intelligence-Laboratory/KTSE``, ``models/model_ktse.py::model_WSSS.update``;
``train.py``; docs/methods/ktse.md).

Network: the GPP classifier (``gpp.py``) whose ``fc9`` has C+1 outputs (channel 0 = background);
the CAM ``F`` = channels 1..C feeds GPP and the logits, the full map ``F_seg`` is supervised by the
self-supervised pseudo-labels. Per step, with anchors ``x`` (the batch) and labels ``y``:

* ``L_cls``: binary cross-entropy of the GPP logits (= multilabel soft margin, Eq. 2), all samples.
* From epoch ``T`` (``start_epoch``, 10) on, each module can be switched (paper Table 6):

  * **SIE** (Eq. 3): for the first ``num_pairs`` (4) anchors that have a *partner* in the batch
    sharing a class (sampled in :meth:`KTSEMethod.losses` from the labels), anchor and partner
    images are concatenated (along the height in the code, ``concat_axis``) and run through the
    network; ``L_kt = mean(relu(cat(F_a, F_p) - F_pair - 0.05) * (y_a OR y_p))`` over
    ``pairs x C x 2h x w``: the pair's CAM must not fall more than the margin below the single
    images' CAMs. Nothing is detached (bidirectional transfer).
  * **SSR** (Eq. 4-7): pseudo-labels from the anchor CAM with two background levels
    (0.30 / 0.15), each refined by PAR (``par.py``): fg/bg from the 0.30 map, 255 where it says
    background, 0 where both say background (no gradient). On ``P = up(relu(F_seg))``:
    ``L_bg`` = CE on background pixels (all images), ``0.0125 L_fg`` = CE on foreground pixels of
    single-class images, ``0.005 L_inter`` for multi-class images (Eq. 6-7: second-largest minus
    the detached largest foreground score where the CAM foreground map exceeds 0.2). With SIE also
    on, the pair's ``F_seg`` is supervised by the concatenated pseudo-labels
    (``L_bg + 0.0125 L_fg``, "L_seg_two").
  * **MGA** (Eq. 8-9): intra-image erasing with a hard mask ``[A_fg < 0.6]`` (image size); for the
    erased image's CAM ``F_m``: global alignment
    ``L_global = mean|GAP(relu(F_m)) y - GAP(relu(F_a)) y|`` and local alignment
    ``L_local = mean(relu(F_m M - F_a M - 0.05) y)`` with ``M = [A_fg(h x w) < 0.6]``; nothing
    detached. Table 7 alternatives (``mga_mode``): ``ga`` (global only), ``rigid`` (BCE of the
    erased image's logits), ``gpp`` (AEFT's soft attraction on GAP of the GPP maps).

Batch size 8 before ``T``, the configured batch size (16) after (:meth:`batch_size_for_epoch`).
Deviations from paper and code: docs/methods/ktse.md.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .aeft import MASK_MODES, attraction_loss, erase_mask, foreground_map, step_generator
from .base import METHODS, POLY_STEPS, StepContext, early_batch_poly_steps
from .gpp import GPP_BINS, GPPMethod, gap_embedding
from .par import PAR_DILATIONS, PAR_ITERATIONS, par_refine

IGNORE_INDEX = 255
CONCAT_AXES = ("height", "width")
MGA_MODES = ("ga_la", "ga", "rigid", "gpp")
# the loss terms of each MGA mode (Table 7)
MGA_TERMS = {"ga_la": ["global", "local"], "ga": ["global"], "rigid": ["erased_cls"], "gpp": ["gpp_attract"]}


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------


def sample_partners(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each anchor, a partner index in the batch (never itself) sharing a class; ``-1`` if none.

    As the official loader (``voc12/data.py::VOC12ClsDataset_SelfSup``), but within the batch:
    draw one of the anchor's classes that another image of the batch has, then one of those
    images, uniformly, from ``generator``.
    """
    lab = (labels.detach() > 0.5).cpu()
    b = lab.shape[0]
    out = torch.full((b,), -1, dtype=torch.long)
    for i in range(b):
        others = lab.clone()
        others[i] = False
        classes = [c for c in torch.nonzero(lab[i]).flatten().tolist() if bool(others[:, c].any())]
        if not classes:
            continue
        c = classes[int(torch.randint(len(classes), (1,), generator=generator))]
        cands = torch.nonzero(others[:, c]).flatten()
        out[i] = cands[int(torch.randint(len(cands), (1,), generator=generator))]
    return out


def concat_pair(a: torch.Tensor, b: torch.Tensor, axis: str = "height") -> torch.Tensor:
    """Concatenate ``... x H x W`` tensors along the height (official code) or the width (paper Fig. 2)."""
    if axis == "height":
        return torch.cat([a, b], dim=-2)
    if axis == "width":
        return torch.cat([a, b], dim=-1)
    raise ValueError(f"concat_axis must be one of {', '.join(CONCAT_AXES)}, got {axis!r}")


def ktse_transfer_hinge(
    target: torch.Tensor, pair_cam: torch.Tensor, labels: torch.Tensor, margin: float = 0.05
) -> torch.Tensor:
    """Eq. 3 (code): ``mean(relu(target - pair_cam - margin) * y)`` over ``N x C x h x w`` (raw CAMs).
    Gradients reach both ``target`` and ``pair_cam`` (bidirectional)."""
    return (F.relu(target - pair_cam - margin) * labels[:, :, None, None]).mean()


def local_alignment_loss(
    cam_masked: torch.Tensor, cam: torch.Tensor, region: torch.Tensor, labels: torch.Tensor, margin: float = 0.05
) -> torch.Tensor:
    """Eq. 9 (code): ``mean(relu(F_m M - F_a M - margin) * y)`` over ``B x C x h x w``; ``region`` M
    is ``B x 1 x h x w`` (1 outside the erased region). No stop-gradient."""
    return (F.relu(cam_masked * region - cam * region - margin) * labels[:, :, None, None]).mean()


def global_alignment_loss(cam_masked: torch.Tensor, cam: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 8 (code): ``mean|GAP(relu(F_m)) y - GAP(relu(F_a)) y|`` over ``B x C``. No stop-gradient."""
    return (gap_embedding(cam_masked, labels) - gap_embedding(cam, labels)).abs().mean()


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel-wise cross-entropy averaged over the non-ignored pixels; 0 (keeping the graph) when
    there are none, where ``F.cross_entropy`` would return NaN."""
    valid = target != ignore_index
    n = int(valid.sum())
    if n == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
    return ce.sum() / n


def background_foreground_ce(
    scores: torch.Tensor, pseudo: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 split as the code's ``get_seg_loss``: CE restricted to the background pixels
    (``pseudo == 0``) and CE restricted to the foreground pixels (``0 < pseudo != ignore``)."""
    bg_target = torch.where(pseudo == 0, pseudo, torch.full_like(pseudo, ignore_index))
    fg_target = torch.where((pseudo > 0) & (pseudo != ignore_index), pseudo, torch.full_like(pseudo, ignore_index))
    return masked_cross_entropy(scores, bg_target, ignore_index), masked_cross_entropy(scores, fg_target, ignore_index)


def inter_class_loss(fg_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6-7: ``sum((V_2nd - V_max.detach()) M) / (sum(M) + 1e-5)`` with ``V_max``, ``V_2nd`` the
    largest and second-largest of the ``C`` foreground scores per pixel (``B x C x H x W``, C >= 2)
    and ``M`` the foreground mask (``B x 1 x H x W``). Only ``V_2nd`` receives gradient."""
    if fg_scores.shape[1] < 2:
        return fg_scores.sum() * 0.0
    top2 = fg_scores.topk(2, dim=1).values
    v_max, v_2nd = top2[:, 0:1], top2[:, 1:2]
    mask = mask.to(fg_scores.dtype)
    return ((v_2nd - v_max.detach()) * mask).sum() / (mask.sum() + 1e-5)


@torch.no_grad()
def two_threshold_pseudo_labels(
    cam: torch.Tensor,
    labels: torch.Tensor,
    image: torch.Tensor,
    high: float = 0.30,
    low: float = 0.15,
    use_par: bool = True,
    scale: float = 0.5,
    dilations: Sequence[int] = PAR_DILATIONS,
    num_iter: int = PAR_ITERATIONS,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """KTSE's ``refine_cams_with_bkg_v2`` (Eq. 4 + PAR; ``models/model_ktse.py``): ``B x H x W`` labels
    (0 = background, c+1 = class c, ``ignore_index`` = uncertain), without gradient.

    ``cam`` (raw ``B x C x h x w``, no ReLU) is divided by its per-class spatial max (+1e-5) and
    upsampled to the image size; a constant background plane (``high`` or ``low``) is put in front;
    both are resized to ``scale`` x the image size, restricted to [background + the image's
    classes], softmax-ed, refined by PAR on the equally resized image, upsampled back (bilinear)
    and arg-maxed. Label = the ``high`` map's class; ``ignore_index`` where the ``high`` map says
    background; 0 where both maps say background. ``use_par=False`` skips the refinement.
    ``image`` may be the normalised network input: PAR's affinity is invariant to per-channel
    affine maps, so de-normalising (as the code does) changes nothing.
    """
    b, _, hh, ww = image.shape
    cam = cam.float()
    norm = cam / (cam.flatten(2).max(dim=-1).values[..., None, None] + 1e-5)
    norm = F.interpolate(norm, size=(hh, ww), mode="bilinear", align_corners=False)
    small = (max(1, int(hh * scale)), max(1, int(ww * scale)))
    img_s = F.interpolate(image.float(), size=small, mode="bilinear", align_corners=False)
    maps = []
    for thr in (high, low):
        with_bg = torch.cat([torch.full_like(norm[:, :1], float(thr)), norm], dim=1)
        maps.append(F.interpolate(with_bg, size=small, mode="bilinear", align_corners=False))
    out = torch.full((2, b, hh, ww), ignore_index, dtype=torch.long, device=cam.device)
    for i in range(b):
        keys = torch.cat(
            [torch.zeros(1, dtype=torch.long, device=cam.device), torch.nonzero(labels[i] > 0.5).flatten() + 1]
        )
        k = len(keys)
        probs = torch.cat([F.softmax(m[i, keys], dim=0) for m in maps], dim=0)[None]  # 1 x 2k x h' x w'
        if use_par:
            probs = par_refine(img_s[i : i + 1], probs, dilations=dilations, num_iter=num_iter)
        probs = F.interpolate(probs, size=(hh, ww), mode="bilinear", align_corners=False)[0]
        out[0, i] = keys[probs[:k].argmax(dim=0)]
        out[1, i] = keys[probs[k:].argmax(dim=0)]
    lab_high, lab_low = out[0], out[1]
    label = lab_high.clone()
    label[lab_high == 0] = ignore_index
    label[(lab_high == 0) & (lab_low == 0)] = 0
    return label


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------


def _choice(name: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")
    return value


@METHODS.register("ktse")
class KTSEMethod(GPPMethod):
    """KTSE on the GPP classifier with a background channel (module docstring; options and
    defaults in docs/methods/ktse.md)."""

    name = "ktse"
    _background = True
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
        sie: bool = True,
        ssr: bool = True,
        mga: bool = True,
        mga_mode: str = "ga_la",
        start_epoch: int = 10,
        early_batch_size: int = 8,
        poly_steps: str = "reference",
        num_pairs: int = 4,
        concat_axis: str = "height",
        kt_margin: float = 0.05,
        kt_weight: float = 1.0,
        kt_detach_target: bool = False,
        pseudo_high: float = 0.30,
        pseudo_low: float = 0.15,
        use_par: bool = True,
        par_scale: float = 0.5,
        par_dilations: Sequence[int] = PAR_DILATIONS,
        par_iterations: int = PAR_ITERATIONS,
        seg_relu: bool = True,
        bg_weight: float = 1.0,
        fg_weight: float = 0.0125,
        inter_weight: float = 0.005,
        inter_threshold: float = 0.2,
        pair_seg_weight: float = 1.0,
        t_erase: float = 0.6,
        mask_mode: str = "hard",
        global_weight: float = 1.0,
        local_weight: float = 1.0,
        local_margin: float = 0.05,
        rigid_weight: float = 1.0,
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
        self.sie, self.ssr, self.mga = bool(sie), bool(ssr), bool(mga)
        self.mga_mode = _choice("mga_mode", mga_mode, MGA_MODES)
        self.concat_axis = _choice("concat_axis", concat_axis, CONCAT_AXES)
        self.mask_mode = _choice("mask_mode", mask_mode, MASK_MODES)
        if self.mga and self.mga_mode == "gpp" and not self.head.bins:
            raise ValueError("mga_mode 'gpp' needs a GPP layer; bins must not be empty")
        for key, v in (
            ("start_epoch", start_epoch),
            ("early_batch_size", early_batch_size),
            ("num_pairs", num_pairs),
            ("par_iterations", par_iterations),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {v!r}")
        if not 0.0 < float(par_scale) <= 1.0:
            raise ValueError(f"par_scale must lie in (0, 1], got {par_scale!r}")
        par_dilations = [int(d) for d in par_dilations]
        if not par_dilations or any(d < 1 for d in par_dilations):
            raise ValueError(f"par_dilations must be positive integers, got {par_dilations!r}")
        if not float(pseudo_low) <= float(pseudo_high):
            raise ValueError(f"pseudo_low ({pseudo_low}) must not exceed pseudo_high ({pseudo_high})")
        self.start_epoch, self.early_batch_size = start_epoch, early_batch_size
        self.poly_steps = _choice("poly_steps", poly_steps, POLY_STEPS)
        self.num_pairs = num_pairs
        self.kt_margin, self.kt_weight = float(kt_margin), float(kt_weight)
        self.kt_detach_target = bool(kt_detach_target)
        self.pseudo_high, self.pseudo_low = float(pseudo_high), float(pseudo_low)
        self.use_par, self.par_scale = bool(use_par), float(par_scale)
        self.par_dilations, self.par_iterations = par_dilations, par_iterations
        self.seg_relu = bool(seg_relu)
        self.bg_weight, self.fg_weight = float(bg_weight), float(fg_weight)
        self.inter_weight, self.inter_threshold = float(inter_weight), float(inter_threshold)
        self.pair_seg_weight = float(pair_seg_weight)
        self.t_erase = float(t_erase)
        self.global_weight, self.local_weight = float(global_weight), float(local_weight)
        self.local_margin = float(local_margin)
        self.rigid_weight = float(rigid_weight)

    def schedule_max_step(self, num_images: int, epochs: int) -> Optional[int]:
        """``poly_steps: reference`` (default): the official ``max_step``, which counts every epoch
        at ``early_batch_size`` (:func:`wsss.methods.base.early_batch_poly_steps`)."""
        return early_batch_poly_steps(self.poly_steps, num_images, epochs, self.early_batch_size)

    def batch_size_for_epoch(self, epoch: int, base: int) -> int:
        """Official schedule: ``early_batch_size`` (8) before ``start_epoch`` (10), ``base`` (16) after;
        ``early_batch_size: 0`` keeps ``base`` throughout."""
        if self.early_batch_size > 0 and epoch < self.start_epoch:
            return self.early_batch_size
        return base

    # -- helpers -------------------------------------------------------------------------------
    def term_names(self):
        """The loss terms this configuration reports (the same set at every step)."""
        names = ["cls"]
        if self.sie:
            names.append("kt")
        if self.ssr:
            names += ["seg_bg", "seg_fg", "seg_inter"]
        if self.sie and self.ssr:
            names.append("seg_pair")
        if self.mga:
            names += MGA_TERMS[self.mga_mode]
        return names

    def _seg_scores(self, cam_seg: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        x = F.relu(cam_seg) if self.seg_relu else cam_seg
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)

    def pseudo_labels(self, cam: torch.Tensor, labels: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return two_threshold_pseudo_labels(
            cam.detach(),
            labels,
            image.detach(),
            high=self.pseudo_high,
            low=self.pseudo_low,
            use_par=self.use_par,
            scale=self.par_scale,
            dilations=self.par_dilations,
            num_iter=self.par_iterations,
        )

    # -- training ------------------------------------------------------------------------------
    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        x, y = batch["image"], batch["label"].float()
        b, _, h, w = x.shape
        out = self.forward_all(x)
        cls = self.classification_loss(out.logits, y)
        terms: Dict[str, torch.Tensor] = {name: cls * 0.0 for name in self.term_names()}
        terms["cls"] = self.cls_weight * cls
        if ctx.epoch < self.start_epoch:
            return terms

        pseudo = self.pseudo_labels(out.cam, y, x) if self.ssr else None

        if self.ssr:
            scores = self._seg_scores(out.cam_seg, (h, w))
            bg, _ = background_foreground_ce(scores, pseudo)
            terms["seg_bg"] = self.bg_weight * bg
            single = y.sum(dim=1) == 1
            if bool(single.any()):
                _, fg = background_foreground_ce(scores[single], pseudo[single])
                terms["seg_fg"] = self.fg_weight * fg
            multi = y.sum(dim=1) >= 2
            if bool(multi.any()):
                with torch.no_grad():
                    fg_map = foreground_map(out.cam[multi], y[multi], (h, w))
                inter = inter_class_loss(scores[multi][:, 1:], (fg_map > self.inter_threshold).float())
                terms["seg_inter"] = self.inter_weight * inter

        if self.sie:
            partners = sample_partners(y, step_generator(ctx.step, salt=1)).to(x.device)
            anchors = torch.nonzero(partners >= 0).flatten()
            if self.num_pairs > 0:
                anchors = anchors[: self.num_pairs]
            if len(anchors) > 0:
                mates = partners[anchors]
                out_two = self.forward_all(concat_pair(x[anchors], x[mates], self.concat_axis))
                target = concat_pair(out.cam[anchors], out.cam[mates], self.concat_axis)
                if self.kt_detach_target:
                    target = target.detach()
                pair_cam = out_two.cam
                if pair_cam.shape[-2:] != target.shape[-2:]:
                    pair_cam = F.interpolate(pair_cam, size=target.shape[-2:], mode="bilinear", align_corners=False)
                y_pair = torch.maximum(y[anchors], y[mates])
                terms["kt"] = self.kt_weight * ktse_transfer_hinge(
                    target.float(), pair_cam.float(), y_pair, self.kt_margin
                )
                if self.ssr:
                    pseudo_pair = concat_pair(pseudo[anchors], pseudo[mates], self.concat_axis)
                    scores_two = self._seg_scores(out_two.cam_seg, tuple(pseudo_pair.shape[-2:]))
                    bg2, fg2 = background_foreground_ce(scores_two, pseudo_pair)
                    terms["seg_pair"] = self.pair_seg_weight * (bg2 + self.fg_weight * fg2)

        if self.mga:
            mask = erase_mask(out.cam, y, (h, w), self.t_erase, self.mask_mode)
            out_m = self.forward_all(x * mask.to(x.dtype))
            if self.mga_mode in ("ga_la", "ga"):
                terms["global"] = self.global_weight * global_alignment_loss(out_m.cam.float(), out.cam.float(), y)
            if self.mga_mode == "ga_la":
                with torch.no_grad():
                    region = (foreground_map(out.cam, y) < self.t_erase).float()
                terms["local"] = self.local_weight * local_alignment_loss(
                    out_m.cam.float(), out.cam.float(), region, y, self.local_margin
                )
            elif self.mga_mode == "rigid":
                terms["erased_cls"] = self.rigid_weight * self.classification_loss(out_m.logits, y)
            elif self.mga_mode == "gpp":
                terms["gpp_attract"] = self.global_weight * attraction_loss(
                    gap_embedding(out.gpp.float(), y), gap_embedding(out_m.gpp.float(), y), "l1"
                )
        return terms


__all__ = [
    "KTSEMethod",
    "background_foreground_ce",
    "concat_pair",
    "global_alignment_loss",
    "inter_class_loss",
    "ktse_transfer_hinge",
    "local_alignment_loss",
    "masked_cross_entropy",
    "sample_partners",
    "two_threshold_pseudo_labels",
]
