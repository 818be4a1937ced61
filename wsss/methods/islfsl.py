"""ISL + FSL (HFPL, Jonnarth et al., WACV 2024): an add-on for any method, built as ``"<method>+islfsl"``.

Paper: *High-fidelity Pseudo-labels for Boosting Weakly-Supervised Segmentation* (seed paper 003);
official code ``arvijj/hfpl`` (``tool/probutils.py``, ``train_cam_voc.py``; commit ``1038a68``).
Documentation with every option and deviation:
``docs/methods/islfsl.md``.

* **ISL** (importance sampling loss, Eqs. 14-18): per image and class, ``N`` pixels are drawn with
  replacement with probability proportional to the binomial posterior ``sigmoid(s_c) + 1e-5``; the
  binary cross-entropy of the sampled *logits* against the image label is averaged over all
  ``B x C x N`` samples. It is mixed with the base method's GAP classification term:
  ``L_cls = (1 - lambda) * L_gap + lambda * L_isl`` (Eq. 16, lambda = 0.2).
* **FSL** (feature similarity loss, Eqs. 9-13 with the binomial changes of §4.3): over all pixel
  pairs ``i, j`` of the CAM grid, ``-(1/(B h w)) sum k_ij * g(y_i, y_j) * f(delta(x_i, x_j))`` with the
  Gaussian spatial weight ``k``, ``g = 0.5 ||y_i - y_j||^2`` of the max-normalised, label-masked CAM
  (plus the background channel ``1 - max_fg`` of the official code), and the colour gate
  ``f = tanh(mu + log(delta / (1 - delta)))`` of the image resized to the CAM grid; ``mu = 2.5`` and
  ``sigma = 5`` are fixed. The pair sum is computed exactly in row blocks (bounded memory): with the
  symmetric constant weights ``W = k * f``, ``sum_ij W_ij g_ij = sum_i y_i . ((D - W) Y)_i`` (graph
  Laplacian form), and ``(D - W) Y`` is accumulated block by block without autograd.
* The multinomial (softmax) variants of the earlier ICASSP paper are options for the ablation.

How the add-on hooks into a base method (the protocol, see the docs): the base method implements
``features_and_cams(images) -> {"cams": raw pre-ReLU class scores B x C x h x w, "logits": B x C, ...}``
and names its GAP classification term in ``islfsl_cls_term`` (and, optionally, in
``islfsl_cls_weight`` the factor that term carries and ISL shares: SEAM's 1/2); optionally it implements
``losses_from_outputs(batch, ctx, outputs)`` so that its loss terms reuse the same forward pass.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .base import ISLFSL_SUFFIX, METHODS, Method, StepContext

SUFFIX = ISLFSL_SUFFIX
POSTERIORS = ("binomial", "multinomial")


# ----------------------------------------------------------------------------------------------
# pure loss functions
# ----------------------------------------------------------------------------------------------


def max_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """HFPL/ACR ``max_norm`` of ``B x K x h x w`` maps, per (image, channel), differentiable:
    ``x = relu(x); relu(x - min - eps) / (max - min + eps)``."""
    x = F.relu(x)
    flat = x.flatten(2)
    mn = flat.min(dim=2).values[..., None, None]
    mx = flat.max(dim=2).values[..., None, None]
    return F.relu(x - mn - eps) / (mx - mn + eps)


def sample_pixel_indices(
    weights: torch.Tensor, num_samples: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """``N`` pixel indices per row of ``weights`` (``R x P``, non-negative), drawn with replacement
    with probability proportional to the weights (``torch.multinomial``; not differentiable)."""
    return torch.multinomial(weights.detach().float(), num_samples, replacement=True, generator=generator)


def isl_binomial(
    cams: torch.Tensor, labels: torch.Tensor, num_samples: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Binomial multi-sample ISL (Eqs. 14, 15, 18; ``HFPL:probutils.sample_probs``).

    ``cams``: raw class scores ``B x C x h x w`` (logits); ``labels``: ``B x C`` multi-hot. Sampling
    weights ``sigmoid(s) + 1e-5``; the loss is the mean BCE-with-logits of the sampled scores.
    """
    b, c = cams.shape[:2]
    flat = cams.flatten(2).reshape(b * c, -1)
    idx = sample_pixel_indices(torch.sigmoid(flat.float()) + 1e-5, num_samples, generator)
    sampled = flat.gather(1, idx).reshape(b, c, num_samples)
    target = labels[:, :, None].to(sampled.dtype).expand_as(sampled)
    return F.binary_cross_entropy_with_logits(sampled.float(), target.float())


def multinomial_posterior(cams: torch.Tensor, bg: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax posterior over ``[background, classes]`` (Eq. 5), ``B x (C+1) x h x w``.

    ``bg`` is the background score map ``B x 1 x h x w``; methods without one get a constant 0
    logit, which makes the single-class case equal the sigmoid."""
    if bg is None:
        bg = torch.zeros_like(cams[:, :1])
    return torch.softmax(torch.cat([bg, cams], dim=1).float(), dim=1)


def isl_multinomial(
    cams: torch.Tensor,
    labels: torch.Tensor,
    num_samples: int,
    bg: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Multinomial multi-sample ISL (Eqs. 5-8 of the ICASSP version, for the ablation): sampling
    proportional to the softmax posterior ``a_c`` of each foreground class, BCE of the sampled
    probability ``a_c(i, j)`` (clamped to ``[1e-6, 1 - 1e-6]``) against the label."""
    b, c = cams.shape[:2]
    a = multinomial_posterior(cams, bg)[:, 1:]
    flat = a.flatten(2).reshape(b * c, -1)
    idx = sample_pixel_indices(flat + 1e-5, num_samples, generator)
    sampled = flat.gather(1, idx).reshape(b, c, num_samples).clamp(1e-6, 1 - 1e-6)
    target = labels[:, :, None].float().expand_as(sampled)
    return F.binary_cross_entropy(sampled, target)


def binomial_fsl_prediction(cams: torch.Tensor, labels: torch.Tensor, background: bool = True) -> torch.Tensor:
    """FSL prediction of the binomial variant (§4.3; ``HFPL:train_cam_voc.py`` L161-171):
    ``max_norm(s) * y`` (present classes only) and, with ``background``, the channel
    ``1 - max_c`` of those maps in front (``B x (C+1) x h x w``)."""
    y = max_norm(cams.float()) * labels[:, :, None, None].float()
    if not background:
        return y
    return torch.cat([1.0 - y.max(dim=1, keepdim=True).values, y], dim=1)


def image_colours(images: torch.Tensor, size, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """RGB in ``[0, 1]`` of the normalised ``images`` resized to ``size`` (bilinear,
    ``align_corners=True`` as HFPL), ``B x 3 x h x w``."""
    x = F.interpolate(images.float(), size=tuple(size), mode="bilinear", align_corners=True)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x * s + m).clamp(0.0, 1.0)


def _grid_positions(h: int, w: int, device) -> torch.Tensor:
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2)


def fsl_pair_weights(
    colours_rows: torch.Tensor,
    colours: torch.Tensor,
    pos_rows: torch.Tensor,
    pos: torch.Tensor,
    mu: float,
    sigma: float,
) -> torch.Tensor:
    """``W_ij = k_ij * f(delta_ij)`` for a block of rows (Eqs. 10, 12, 13; HFPL clamps delta).

    ``colours_rows``: ``B x R x 3``, ``colours``: ``B x P x 3`` (RGB in [0, 1]); ``pos_rows``:
    ``R x 2``, ``pos``: ``P x 2`` grid positions. Returns ``B x R x P``.
    """
    delta = ((colours_rows[:, :, None, :] - colours[:, None, :, :]).abs().sum(-1) / 3.0).clamp(0.0, 1.0)
    gate = torch.tanh(mu + torch.log((delta + 1e-5) / (1.0 - delta + 1e-5)))
    d2 = ((pos_rows[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    k = torch.exp(-0.5 * d2 / sigma**2) / (2.0 * math.pi * sigma**2)
    return gate * k[None]


def fsl_loss_naive(pred: torch.Tensor, colours: torch.Tensor, mu: float = 2.5, sigma: float = 5.0) -> torch.Tensor:
    """FSL over all pixel pairs, materialising the ``B x P x P`` tensors (reference for tests).

    ``pred``: ``B x K x h x w`` (differentiable), ``colours``: ``B x 3 x h x w`` in [0, 1].
    ``L = -(1/(B h w)) sum_b sum_ij k_ij * 0.5 ||y_i - y_j||^2 * f(delta_ij)``.
    """
    b, k, h, w = pred.shape
    y = pred.float().flatten(2).transpose(1, 2)  # B x P x K
    x = colours.float().flatten(2).transpose(1, 2)
    pos = _grid_positions(h, w, pred.device)
    wts = fsl_pair_weights(x, x, pos, pos, mu, sigma)
    dy = 0.5 * ((y[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    return -(wts * dy).sum() / (b * h * w)


def fsl_loss(
    pred: torch.Tensor, colours: torch.Tensor, mu: float = 2.5, sigma: float = 5.0, chunk: int = 256
) -> torch.Tensor:
    """FSL over all pixel pairs, exact, with memory ``O(B * chunk * P)`` instead of ``O(B * P^2)``.

    With ``W`` symmetric and constant (it depends on colours and positions only),
    ``sum_ij W_ij 0.5 ||y_i - y_j||^2 = sum_i y_i . Z_i`` with ``Z = (D - W) Y`` (``D`` = row sums),
    and the gradient w.r.t. ``Y`` is ``2 Z``. ``Z`` is accumulated in blocks of ``chunk`` rows under
    ``no_grad``; the returned value ``-(2 Y.Z - Y_detached.Z) / (B h w)`` has the exact value and the
    exact gradient of :func:`fsl_loss_naive` (up to float rounding).
    """
    if chunk < 1:
        raise ValueError(f"fsl chunk must be >= 1, got {chunk}")
    b, k, h, w = pred.shape
    p = h * w
    y = pred.float().flatten(2).transpose(1, 2)  # B x P x K
    x = colours.float().flatten(2).transpose(1, 2).detach()
    pos = _grid_positions(h, w, pred.device)
    with torch.no_grad():
        yd = y.detach()
        z = torch.empty_like(yd)
        for start in range(0, p, chunk):
            stop = min(start + chunk, p)
            wts = fsl_pair_weights(x[:, start:stop], x, pos[start:stop], pos, mu, sigma)  # B x R x P
            z[:, start:stop] = wts.sum(-1, keepdim=True) * yd[:, start:stop] - torch.bmm(wts, yd)
    quad = 2.0 * (y * z).sum() - (yd * z).sum()
    return -quad / (b * h * w)


# ----------------------------------------------------------------------------------------------
# the add-on method
# ----------------------------------------------------------------------------------------------


def supports_islfsl(method_or_class: Any) -> bool:
    """Whether a method (class or instance) implements the ISL/FSL protocol."""
    return callable(getattr(method_or_class, "features_and_cams", None)) and not getattr(
        method_or_class, "is_islfsl_addon", False
    )


class ISLFSL(Method):
    """``"<base>+islfsl"``: the base method with ISL mixed into its GAP term and FSL added.

    Options (``method_options: {islfsl: {...}}``; everything else goes to the base method):
    ``isl`` (True), ``fsl`` (True), ``posterior`` ("binomial" | "multinomial"), ``num_samples``
    (N = 10), ``isl_lambda`` (0.2), ``fsl_weight`` (1.0; 0.2 on COCO), ``fsl_mu`` (2.5),
    ``fsl_sigma`` (5.0, CAM-grid pixels), ``fsl_background`` (True: the ``1 - max_fg`` channel of
    the official code), ``fsl_upsample`` (1; integer CAM upsampling before FSL), ``fsl_chunk`` (256
    rows per block), ``scale`` (1.0; multiplies the ISL and FSL terms, 0.1 for SIPE/MCTformer).

    Delegates ``param_groups``, ``cam``, ``logits``, ``batch_size_for_epoch``, ``schedule_max_step`` and
    ``features_and_cams`` to the base; the base is the submodule ``base`` (state_dict keys
    ``base.*``).
    """

    is_islfsl_addon = True

    def __init__(
        self,
        base: Method,
        *,
        isl: bool = True,
        fsl: bool = True,
        posterior: str = "binomial",
        num_samples: int = 10,
        isl_lambda: float = 0.2,
        fsl_weight: float = 1.0,
        fsl_mu: float = 2.5,
        fsl_sigma: float = 5.0,
        fsl_background: bool = True,
        fsl_upsample: int = 1,
        fsl_chunk: int = 256,
        scale: float = 1.0,
    ):
        super().__init__()
        if not supports_islfsl(base):
            raise TypeError(
                f"method {getattr(base, 'name', type(base).__name__)!r} does not implement the ISL/FSL protocol "
                "(features_and_cams); see docs/methods/islfsl.md"
            )
        if getattr(type(base), "train_step", None) is not None:
            raise TypeError(
                f"method {base.name!r} takes over the update (train_step); the ISL/FSL add-on needs losses()"
            )
        if posterior not in POSTERIORS:
            raise ValueError(f"islfsl.posterior must be one of {POSTERIORS}, got {posterior!r}")
        if int(num_samples) < 1:
            raise ValueError(f"islfsl.num_samples must be >= 1, got {num_samples!r}")
        if not 0.0 <= float(isl_lambda) <= 1.0:
            raise ValueError(f"islfsl.isl_lambda must be in [0, 1], got {isl_lambda!r}")
        if float(fsl_sigma) <= 0:
            raise ValueError(f"islfsl.fsl_sigma must be > 0, got {fsl_sigma!r}")
        if int(fsl_upsample) < 1 or int(fsl_upsample) != fsl_upsample:
            raise ValueError(f"islfsl.fsl_upsample must be a positive integer, got {fsl_upsample!r}")
        if int(fsl_chunk) < 1:
            raise ValueError(f"islfsl.fsl_chunk must be >= 1, got {fsl_chunk!r}")
        self.base = base
        self.name = f"{base.name}{SUFFIX}"
        self.num_classes = getattr(base, "num_classes", None)
        self.isl, self.fsl = bool(isl), bool(fsl)
        self.posterior = posterior
        self.num_samples = int(num_samples)
        self.isl_lambda = float(isl_lambda)
        self.fsl_weight = float(fsl_weight)
        self.fsl_mu, self.fsl_sigma = float(fsl_mu), float(fsl_sigma)
        self.fsl_background = bool(fsl_background)
        self.fsl_upsample = int(fsl_upsample)
        self.fsl_chunk = int(fsl_chunk)
        self.scale = float(scale)
        self.cls_term: Optional[str] = getattr(base, "islfsl_cls_term", None)

    # -- delegation ----------------------------------------------------------------------------
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.base.param_groups()

    def cam(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.cam(images)

    def raw_cam(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.raw_cam(images)

    @property
    def cam_upsample(self) -> str:
        """The wrapped method's CAM inference order (the add-on does not change inference)."""
        return self.base.cam_upsample

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.logits(images)

    def features_and_cams(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.base.features_and_cams(images)

    def batch_size_for_epoch(self, epoch: int, base: int) -> int:
        return self.base.batch_size_for_epoch(epoch, base)

    def schedule_max_step(self, num_images: int, epochs: int) -> Optional[int]:
        return self.base.schedule_max_step(num_images, epochs)

    @property
    def output_stride(self) -> int:
        return self.base.output_stride

    # -- losses --------------------------------------------------------------------------------
    def isl_term(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        cams = outputs["cams"]
        if self.posterior == "binomial":
            return isl_binomial(cams, labels, self.num_samples)
        return isl_multinomial(cams, labels, self.num_samples, bg=outputs.get("bg_cams"))

    def fsl_term(self, outputs: Mapping[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cams = outputs["cams"].float()
        bg = outputs.get("bg_cams")
        if self.fsl_upsample > 1:
            size = (cams.shape[2] * self.fsl_upsample, cams.shape[3] * self.fsl_upsample)
            cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
            if bg is not None:
                bg = F.interpolate(bg.float(), size=size, mode="bilinear", align_corners=False)
        if self.posterior == "binomial":
            pred = binomial_fsl_prediction(cams, labels, self.fsl_background)
        else:
            pred = multinomial_posterior(cams, bg)
        colours = image_colours(images, pred.shape[2:])
        return fsl_loss(pred, colours, self.fsl_mu, self.fsl_sigma, self.fsl_chunk)

    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        outputs = self.base.features_and_cams(images)
        if callable(getattr(self.base, "losses_from_outputs", None)):
            terms = dict(self.base.losses_from_outputs(batch, ctx, outputs))
        else:  # a second forward pass of the base (documented cost)
            terms = dict(self.base.losses(batch, ctx))
        for k in ("isl", "fsl"):
            if k in terms:
                raise RuntimeError(f"method {self.base.name!r} already has a loss term named {k!r}")
        with torch.autocast(device_type=images.device.type, enabled=False):
            if self.isl:
                if self.cls_term is not None:
                    if self.cls_term not in terms:
                        raise KeyError(
                            f"method {self.base.name!r} names {self.cls_term!r} as its GAP term (islfsl_cls_term) "
                            f"but returned the terms {sorted(terms)}"
                        )
                    terms[self.cls_term] = (1.0 - self.isl_lambda) * terms[self.cls_term]
                if self.isl_lambda > 0:
                    w = float(getattr(self.base, "islfsl_cls_weight", 1.0))
                    terms["isl"] = self.scale * self.isl_lambda * w * self.isl_term(outputs, labels)
                else:
                    terms["isl"] = outputs["cams"].new_zeros((), dtype=torch.float32)
            if self.fsl:
                terms["fsl"] = self.scale * self.fsl_weight * self.fsl_term(outputs, images, labels)
        return terms


def build_islfsl(
    base_name: str, num_classes: int, backbone: nn.Module, islfsl: Optional[Mapping[str, Any]] = None, **options: Any
) -> ISLFSL:
    """Build ``"<base_name>+islfsl"``: the registered base with ``options``, wrapped by :class:`ISLFSL`
    with the ``islfsl`` options (unknown names raise ``TypeError``)."""
    if base_name.endswith(SUFFIX):
        raise ValueError(f"method '{base_name}{SUFFIX}': the ISL/FSL add-on cannot be applied twice")
    if base_name not in METHODS:
        raise KeyError(
            f"unknown method {base_name!r} in '{base_name}{SUFFIX}'; valid names: {', '.join(METHODS.names())}"
        )
    if not supports_islfsl(METHODS.get(base_name)):
        raise TypeError(
            f"method {base_name!r} does not implement the ISL/FSL protocol (features_and_cams); "
            f"'{base_name}{SUFFIX}' is not available (docs/methods/islfsl.md)"
        )
    if islfsl is not None and not isinstance(islfsl, Mapping):
        raise TypeError(f"method_options.islfsl must be a mapping of ISL/FSL options, got {type(islfsl).__name__}")
    base = METHODS.build(base_name, num_classes=num_classes, backbone=backbone, **options)
    addon = {k: v for k, v in dict(islfsl or {}).items() if v is not None}
    return ISLFSL(base, **addon)
