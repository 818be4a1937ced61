"""SEAM: Self-supervised Equivariant Attention Mechanism (Wang et al., CVPR 2020).

Official code ``YudeWang/SEAM`` (``network/resnet38_SEAM.py``, ``train_SEAM.py``, ``infer_SEAM.py``)
and HFPL's copy ``arvijj/hfpl`` (``network/resnet38_SEAM.py``, ``train_cam_voc.py``,
``infer_cam_voc.py``), which is the base of HFPL's published ``seam+islfsl`` configuration.
Options, equations and every code-vs-paper switch: ``docs/methods/seam.md``.

Network (any backbone of ``wsss.models``):

* head: ``Dropout2d(0.5)`` on the backbone output, ``fc8`` 1x1 conv -> ``C + 1`` channels (no bias,
  Xavier-uniform), **channel 0 = background** (it never receives a loss: everywhere a background
  score is needed it is ``1 - max_fg``). Its output at the feature grid is the raw CAM ``s``.
* PCM (pixel correlation module): the seed is the detached CAM, ReLU'd and divided by its maximum
  per channel, background ``1 - max_fg``, and (code) every foreground channel zeroed where it is
  not the per-pixel foreground maximum (:func:`pcm_seed`). Features: ``f8_3`` (1x1, 64 ch) and
  ``f8_4`` (1x1, 128 ch), each + ReLU, on two *detached* intermediate backbone maps, concatenated
  with the image bilinearly resized to the CAM grid (3 ch) and projected by ``f9`` (1x1, 195 ->
  192). With ``f`` L2-normalised per pixel, ``A = relu(f^T f)`` normalised so that every column sums
  to 1, and ``y_rv = seed @ A`` (:func:`pcm_refine`).
  ResNet-38 (the paper) uses ``conv4`` (input of b5, 512 ch) and ``conv5`` (input of b6, 1024 ch):
  the two backbone taps before the last stage. For other backbones the same rule picks the taps
  (torchvision ResNets: ``stage2`` and ``stage3``, 512/1024 channels for ResNet-50/101); taps on a
  different grid than the CAM are resized bilinearly (``align_corners=True``) to it. ``pcm_taps``
  names them explicitly.
* In the forward pass the raw CAM and the PCM output are bilinearly upsampled to the input size
  (``align_corners=True``), as the official network returns them; the losses below live there.

Per step, with ``x1`` the batch, ``x2 = bilinear(x1, scale 0.3, align_corners=True)`` (the
equivariant transform A), ``y`` the labels and ``y+ = [1, y]``:

* ``L_cls = (MLSM(GAP(cam1)_fg, y) + MLSM(GAP(cam2)_fg, y)) / 2`` (terms ``cls1``, ``cls2``);
* ``L_rvmin = (amp(y_rv1 y+) + amp(y_rv2 y+)) / 2`` (code only: the mean ReLU of the lowest 25 % of
  the per-pixel foreground maximum of the refined CAM; :func:`adaptive_min_pooling_loss`);
* maps are then ``max_norm``-ed and label-masked, view 1's also downscaled to view 2's size:
  ``L_er = mean |cam1_fg - cam2_fg|`` (:func:`er_loss`);
* with the background channels set to ``1 - max_fg``:
  ``L_ecr = topk_mean(|onehot(cam2) - y_rv1|) + topk_mean(|onehot(cam1) - y_rv2|)`` over the
  top 20 % of the ``(C+1) h w`` entries per image, raw CAMs detached (:func:`ecr_loss`);
* ``L = L_cls + L_rvmin + L_er + L_ecr`` (all weights 1).

CAM inference (``cam_upsample = raw_then_relu``, :meth:`SEAMMethod.raw_cam`): the official code
uses the PCM-refined CAM ``y_rv`` (foreground channels) of each of the 8 views, upsampled to the
view size inside the network, then to the image size (``align_corners=False``), summed and
min-max normalised (``cam.normalisation: minmax``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import METHODS, Method, StepContext
from .islfsl import max_norm

INFERENCE_MAPS = ("pcm", "cam")


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------


def background_from_foreground(maps: torch.Tensor) -> torch.Tensor:
    """``maps`` (``B x (1+C) x h x w``, channel 0 = background) with channel 0 replaced by
    ``1 - max_c maps[:, 1:]`` (out of place)."""
    bg = 1.0 - maps[:, 1:].max(dim=1, keepdim=True).values
    return torch.cat([bg, maps[:, 1:]], dim=1)


def max_onehot(maps: torch.Tensor) -> torch.Tensor:
    """``train_SEAM.py::max_onehot`` (out of place): keep channel 0 and, per pixel, the foreground
    channels equal to the foreground maximum; zero every other foreground channel."""
    fg = maps[:, 1:]
    keep = fg == fg.max(dim=1, keepdim=True).values
    return torch.cat([maps[:, :1], fg * keep], dim=1)


@torch.no_grad()
def pcm_seed(cam: torch.Tensor, onehot: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """The PCM input of the official network (no gradient), from the raw CAM ``B x (1+C) x h x w``:
    ``n = relu(relu(cam) - eps) / (max_hw relu(cam) + eps)`` per (image, channel); channel 0 :=
    ``1 - max_fg n``; with ``onehot`` every foreground value below the per-pixel foreground
    maximum is zeroed (all classes, not only the image's labels)."""
    x = F.relu(cam.detach().float())
    mx = x.flatten(2).max(dim=-1).values[..., None, None] + eps
    n = background_from_foreground(F.relu(x - eps) / mx)
    if onehot:
        fg = n[:, 1:]
        n = torch.cat([n[:, :1], fg * (fg >= fg.max(dim=1, keepdim=True).values)], dim=1)
    return n


def pcm_affinity(feats: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``B x P x P`` affinity of ``B x D x h x w`` features: cosine similarity (norm ``+ eps``),
    ReLU'd, each column divided by its sum ``+ eps`` (so ``A[:, :, j]`` sums to 1 over ``i``)."""
    f = feats.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    aff = F.relu(torch.bmm(f.transpose(1, 2), f))
    return aff / (aff.sum(dim=1, keepdim=True) + eps)


def pcm_refine(seed: torch.Tensor, feats: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """PCM (Eq. 6 of the paper with the official normalisation): ``y_rv[:, :, j] = sum_i seed[:, :, i]
    A[i, j]`` with ``A = pcm_affinity(feats)``; ``seed`` ``B x K x h x w`` on the grid of ``feats``."""
    b, k, h, w = seed.shape
    aff = pcm_affinity(feats, eps)
    return torch.bmm(seed.flatten(2).to(aff.dtype), aff).reshape(b, k, h, w)


def adaptive_min_pooling_loss(maps: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """``train_SEAM.py::adaptive_min_pooling_loss``: ``m = max_c maps`` per pixel (``maps`` = the
    label-masked foreground channels, ``B x C x h x w``), the sum of ``relu`` of its ``k =
    int(h w fraction)`` smallest values per image, divided by ``k B`` (``k >= 1``)."""
    b, _, h, w = maps.shape
    k = max(1, int(h * w * fraction))
    low = torch.topk(maps.max(dim=1).values.reshape(b, -1), k=k, dim=-1, largest=False).values
    return F.relu(low).sum() / (k * b)


def er_loss(cam_a: torch.Tensor, cam_b: torch.Tensor, background: bool = False) -> torch.Tensor:
    """Equivariant regularisation between two ``B x (1+C) x h x w`` normalised, label-masked CAMs
    on the same grid: ``mean |a - b|`` over the foreground channels (code), or over all channels
    with the background ``1 - max_fg`` (``background``)."""
    if background:
        return (background_from_foreground(cam_a) - background_from_foreground(cam_b)).abs().mean()
    return (cam_a[:, 1:] - cam_b[:, 1:]).abs().mean()


def topk_mean(err: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the ``k = int(n fraction)`` largest of the ``n`` entries of each image of ``err``
    (``B x ...``), over images (``k >= 1``; ``fraction = 1`` is the plain mean)."""
    flat = err.reshape(err.shape[0], -1)
    k = max(1, min(flat.shape[1], int(flat.shape[1] * fraction)))
    if k == flat.shape[1]:
        return flat.mean()
    return torch.topk(flat, k=k, dim=-1).values.mean()


def ecr_loss(
    target: torch.Tensor, refined: torch.Tensor, fraction: float = 0.2, onehot: bool = True, detach: bool = True
) -> torch.Tensor:
    """One equivariant cross regularisation term: ``topk_mean(|t - refined|)`` with ``t`` the other
    view's normalised CAM (background ``1 - max_fg`` already in channel 0), through
    :func:`max_onehot` (``onehot``) and detached (``detach``), as ``train_SEAM.py``."""
    if detach:
        target = target.detach()
    if onehot:
        target = max_onehot(target)
    return topk_mean((target - refined).abs(), fraction)


def default_pcm_taps(backbone: nn.Module) -> Tuple[str, str]:
    """The two backbone taps before the last stage (ResNet-38: ``conv4``, ``conv5``; torchvision
    ResNets: ``stage2``, ``stage3``): ``tap_channels`` in order without ``"out"``, minus the
    last (the output) tap, the last two of the rest."""
    names = [n for n in backbone.tap_channels if n != "out"][:-1]
    if len(names) < 2:
        raise ValueError(f"backbone {type(backbone).__name__} has fewer than two intermediate taps for the PCM")
    return names[-2], names[-1]


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------


def _fraction(name: str, v: float) -> float:
    v = float(v)
    if not 0.0 < v <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {v!r}")
    return v


@METHODS.register("seam")
class SEAMMethod(Method):
    """SEAM (module docstring; options and defaults in docs/methods/seam.md)."""

    name = "seam"
    #: official ``infer_SEAM.py``: the refined CAM resized to the image size, summed, no per-view ReLU
    #: (the refined CAM is non-negative, so ``raw_then_relu`` computes the same)
    cam_upsample = "raw_then_relu"

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        head_lr_mult: float = 10.0,
        head_dropout: float = 0.5,
        scale_factor: float = 0.3,
        cls_weight: float = 1.0,
        er_weight: float = 1.0,
        ecr_weight: float = 1.0,
        rvmin: bool = True,
        rvmin_weight: float = 1.0,
        rvmin_fraction: float = 0.25,
        ecr_topk: float = 0.2,
        ecr_onehot: bool = True,
        ecr_detach: bool = True,
        er_background: bool = False,
        pcm_onehot: bool = True,
        pcm_detach: bool = True,
        pcm_image: bool = True,
        pcm_taps: Optional[Sequence[str]] = None,
        pcm_channels: Sequence[int] = (64, 128),
        pcm_dim: int = 192,
        inference: str = "pcm",
    ):
        super().__init__()
        if not 0.0 < float(scale_factor) < 1.0:
            raise ValueError(f"scale_factor must be in (0, 1), got {scale_factor!r}")
        if not 0.0 <= float(head_dropout) < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout!r}")
        if inference not in INFERENCE_MAPS:
            raise ValueError(f"inference must be one of {', '.join(INFERENCE_MAPS)}, got {inference!r}")
        taps = tuple(pcm_taps) if pcm_taps is not None else default_pcm_taps(backbone)
        if len(taps) != 2 or any(t not in backbone.tap_channels for t in taps):
            raise ValueError(
                f"pcm_taps must name two taps of the backbone ({', '.join(backbone.tap_channels)}), got {pcm_taps!r}"
            )
        channels = tuple(int(c) for c in pcm_channels)
        if len(channels) != 2 or min(channels) < 1 or int(pcm_dim) < 1:
            raise ValueError(
                f"pcm_channels must be two positive integers and pcm_dim positive, got {pcm_channels!r}, {pcm_dim!r}"
            )

        self.backbone = backbone
        self.num_classes = num_classes
        self.dropout7 = nn.Dropout2d(float(head_dropout))
        self.fc8 = nn.Conv2d(backbone.out_channels, num_classes + 1, 1, bias=False)
        self.f8_3 = nn.Conv2d(backbone.tap_channels[taps[0]], channels[0], 1, bias=False)
        self.f8_4 = nn.Conv2d(backbone.tap_channels[taps[1]], channels[1], 1, bias=False)
        self.f9 = nn.Conv2d(channels[0] + channels[1] + (3 if pcm_image else 0), int(pcm_dim), 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        nn.init.kaiming_normal_(self.f8_3.weight)
        nn.init.kaiming_normal_(self.f8_4.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

        self.pcm_taps = taps
        self.head_lr_mult = float(head_lr_mult)
        self.scale_factor = float(scale_factor)
        self.cls_weight, self.er_weight, self.ecr_weight = float(cls_weight), float(er_weight), float(ecr_weight)
        self.rvmin, self.rvmin_weight = bool(rvmin), float(rvmin_weight)
        self.rvmin_fraction = _fraction("rvmin_fraction", rvmin_fraction)
        self.ecr_topk = _fraction("ecr_topk", ecr_topk)
        self.ecr_onehot, self.ecr_detach = bool(ecr_onehot), bool(ecr_detach)
        self.er_background = bool(er_background)
        self.pcm_onehot, self.pcm_detach, self.pcm_image = bool(pcm_onehot), bool(pcm_detach), bool(pcm_image)
        self.inference = inference

    # -- parameters ----------------------------------------------------------------------------
    def head_modules(self) -> List[nn.Module]:
        return [self.fc8, self.f8_3, self.f8_4, self.f9]

    def param_groups(self) -> List[Dict[str, Any]]:
        head = [p for m in self.head_modules() for p in m.parameters()]
        return [
            {"name": "backbone", "params": [p for p in self.backbone.parameters() if p.requires_grad], "lr_mult": 1.0},
            {"name": "head", "params": head, "lr_mult": self.head_lr_mult},
        ]

    # -- forward -------------------------------------------------------------------------------
    def forward_maps(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One forward pass at the feature grid: ``score`` = raw CAM ``B x (1+C) x h x w`` (channel
        0 = background), ``refined`` = the PCM output (same shape), ``features`` = backbone output."""
        taps = self.backbone.forward_dict(images)
        score = self.fc8(self.dropout7(taps["out"]))
        size = score.shape[-2:]
        feats = []
        if self.pcm_image:
            feats.append(F.interpolate(images, size=size, mode="bilinear", align_corners=True).to(score.dtype))
        for conv, name in ((self.f8_3, self.pcm_taps[0]), (self.f8_4, self.pcm_taps[1])):
            t = taps[name].detach() if self.pcm_detach else taps[name]
            if t.shape[-2:] != size:
                t = F.interpolate(t, size=size, mode="bilinear", align_corners=True)
            feats.append(F.relu(conv(t)))
        f = self.f9(torch.cat(feats, dim=1))
        with torch.autocast(device_type=images.device.type, enabled=False):
            refined = pcm_refine(pcm_seed(score, self.pcm_onehot), f.float())
        return {"score": score, "refined": refined, "features": taps["out"]}

    @staticmethod
    def to_input_size(maps: torch.Tensor, size) -> torch.Tensor:
        """The official network's output resizing: bilinear, ``align_corners=True``."""
        return F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=True)

    def _inference_map(self, out: Dict[str, torch.Tensor]) -> torch.Tensor:
        return out["refined"] if self.inference == "pcm" else out["score"]

    def cam(self, images: torch.Tensor) -> torch.Tensor:
        """The ReLU'd foreground CAM at the feature grid: the PCM-refined CAM (``inference: pcm``) or
        the raw ``fc8`` CAM (``inference: cam``)."""
        return F.relu(self._inference_map(self.forward_maps(images))[:, 1:])

    def raw_cam(self, images: torch.Tensor) -> torch.Tensor:
        """The official inference map: foreground channels upsampled to the input size
        (``align_corners=True``) as the network returns them; :mod:`wsss.cam_infer` then resizes
        them to the image size and sums the views (``cam_upsample = raw_then_relu``)."""
        return self.to_input_size(self._inference_map(self.forward_maps(images))[:, 1:], images.shape[-2:])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``B x C``: GAP of the input-size CAM, foreground channels (the classification scores)."""
        score = self.forward_maps(images)["score"]
        return self.to_input_size(score, images.shape[-2:]).mean(dim=(2, 3))[:, 1:]

    # -- losses --------------------------------------------------------------------------------
    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        return self.losses_from_outputs(batch, ctx, self.features_and_cams(batch["image"]))

    def losses_from_outputs(
        self, batch: Dict[str, Any], ctx: StepContext, outputs: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """The SEAM terms of the batch, view 1 from :meth:`features_and_cams` ``outputs``."""
        x1, y = batch["image"], batch["label"].float()
        x2 = F.interpolate(x1, scale_factor=self.scale_factor, mode="bilinear", align_corners=True)
        out2 = self.forward_maps(x2)
        y1 = torch.cat([torch.ones_like(y[:, :1]), y], dim=1)[:, :, None, None]

        with torch.autocast(device_type=x1.device.type, enabled=False):
            cam1, rv1 = outputs["seam_cam"].float(), outputs["seam_refined"].float()
            cam2 = self.to_input_size(out2["score"], x2.shape[-2:])
            rv2 = self.to_input_size(out2["refined"], x2.shape[-2:])
            cls1 = F.multilabel_soft_margin_loss(outputs["logits"].float(), y)
            cls2 = F.multilabel_soft_margin_loss(cam2.mean(dim=(2, 3))[:, 1:], y)
            terms: Dict[str, torch.Tensor] = {
                "cls1": 0.5 * self.cls_weight * cls1,
                "cls2": 0.5 * self.cls_weight * cls2,
            }
            if self.rvmin:
                rvmin1 = adaptive_min_pooling_loss((rv1 * y1)[:, 1:], self.rvmin_fraction)
                rvmin2 = adaptive_min_pooling_loss((rv2 * y1)[:, 1:], self.rvmin_fraction)
                terms["rvmin"] = 0.5 * self.rvmin_weight * (rvmin1 + rvmin2)

            size2 = cam2.shape[-2:]
            cam1 = F.interpolate(max_norm(cam1), size=size2, mode="bilinear", align_corners=True) * y1
            rv1 = F.interpolate(max_norm(rv1), size=size2, mode="bilinear", align_corners=True) * y1
            cam2 = max_norm(cam2) * y1
            rv2 = max_norm(rv2) * y1
            terms["er"] = self.er_weight * er_loss(cam1, cam2, self.er_background)
            cam1, cam2 = background_from_foreground(cam1), background_from_foreground(cam2)
            ecr1 = ecr_loss(cam2, rv1, self.ecr_topk, self.ecr_onehot, self.ecr_detach)
            ecr2 = ecr_loss(cam1, rv2, self.ecr_topk, self.ecr_onehot, self.ecr_detach)
            terms["ecr"] = self.ecr_weight * (ecr1 + ecr2)
        return terms

    # -- ISL/FSL add-on protocol (wsss.methods.islfsl, docs/methods/islfsl.md) ------------------
    #: HFPL mixes ISL into the full-scale view's GAP term only: ((1 - l) L_cls1 + l L_isl + L_cls2) / 2
    islfsl_cls_term = "cls1"

    @property
    def islfsl_cls_weight(self) -> float:
        """The weight of ``cls1`` in the loss (the mean over the two views), which ISL shares."""
        return 0.5 * self.cls_weight

    def features_and_cams(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """View 1's forward pass: ``cams`` = the raw foreground ``fc8`` scores at the feature grid
        (HFPL's ``logits1[:, 1:]``, for ISL and FSL), ``bg_cams`` = channel 0, ``logits`` = GAP of
        the input-size CAM (foreground), ``features``; ``seam_cam``/``seam_refined`` = the input-size
        raw and refined CAMs (all channels) for :meth:`losses_from_outputs`."""
        out = self.forward_maps(images)
        size = images.shape[-2:]
        cam = self.to_input_size(out["score"], size)
        return {
            "cams": out["score"][:, 1:],
            "bg_cams": out["score"][:, :1],
            "logits": cam.mean(dim=(2, 3))[:, 1:],
            "features": out["features"],
            "seam_cam": cam,
            "seam_refined": self.to_input_size(out["refined"], size),
        }


__all__ = [
    "SEAMMethod",
    "adaptive_min_pooling_loss",
    "background_from_foreground",
    "default_pcm_taps",
    "ecr_loss",
    "er_loss",
    "max_onehot",
    "pcm_affinity",
    "pcm_refine",
    "pcm_seed",
    "topk_mean",
]
