"""ACR: adversarial learning of a classifier and a reconstructor (Kweon, Yoon, Yoon, CVPR 2023).

Paper: *Weakly Supervised Semantic Segmentation via Adversarial Learning of Classifier and
Reconstructor* (seed paper 002); official code ``sangrockEG/ACR`` (``networks/resnet38d.py``,
``models/exp_recon_cvpr23.py::Exp.training_step``; commit ``443dff9``).
All options, equations and paper/code deviations: ``docs/methods/acr.md``.

Networks (``Net_main``, ``Net_recon``). The **classifier** ``F`` = backbone -> ``fc8`` (1x1, 256,
ReLU) -> ``fc9`` (1x1, C), both bias-free and Xavier-initialised; logits = GAP of the raw CAM. The
**reconstructor** ``G`` is a second network of the same architecture (its own backbone, a deep copy
of the classifier's, so both start from the same pretrained weights, and its own classification head
trained with BCE as in the official code) plus the encoder head: 1x1 bias-free convs reduce three
backbone taps of increasing depth (ResNet-38: conv4/conv5/conv6 -> 64/128/256 channels), each is
bilinearly upsampled to the input size and concatenated (``X``, 448 channels), and the pix2pix U-Net
``G_D`` decodes it to an image compared with the ImageNet-normalised input.

Training (``Exp.training_step``), every iteration on the same batch, one target class ``t`` per image:

* **RU phase** (reconstructor updated by its own optimiser, classifier frozen): the classifier's
  no-grad CAM ``A_t`` (``max_norm`` x label, bilinear to the input size) decomposes ``X``;
  stochastic remnant feeding (SRF) applies the decomposition only on the cells of a 16x16 Bernoulli
  grid. Paper Eqs. 4-10 with ``g = 1 - G``, ``G ~ Bernoulli(p)``, ``p = 0.20 + 0.01 * epoch``:
  ``I_t = G_D(X * (1 - (1 - A_t) G))`` validated on ``V_t = (1 - A_t) G`` and
  ``I_nt = G_D(X * (1 - A_t G))`` validated on ``V_nt = A_t G``; plus the code's extra terms
  ``BCE(G's logits)`` and ``L1(G_D(X.detach()), I)``.
* **CU phase** (classifier updated by the engine's optimiser, reconstructor frozen and in eval
  mode): ``X`` without grad, differentiable ``A_t``; ``I_t = G_D(A_t X)``, ``I_nt = G_D((1 - A_t) X)``;
  ``L = BCE - 0.8 |V_t (I - I_t)|_1 - 0.3 |V_nt (I - I_nt)|_1`` with the code's detached masks
  ``V_t = [A_t == 0]``, ``V_nt = A_t [argmax CAM == t]`` (or the paper's ``1 - A_t``, ``A_t``).

The reconstructor's SGD optimiser lives in the method; its lr follows the engine's poly schedule
(the same factor as the engine optimiser's first group) and its state is checkpointed through
``extra_state_dict`` / ``load_extra_state_dict``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import METHODS, Method, StepContext
from .islfsl import max_norm

MODES = ("adversarial", "pretrain", "frozen")
CU_MASKS = ("code", "paper")
#: pix2pix U-Net channels per level (down1..down8)
UNET_CHANNELS = (64, 128, 256, 512, 512, 512, 512, 512)
#: ``Exp.training_step``: an image counts for the RU non-target term when its input mask keeps
#: more than this many pixels (practically always)
VALID_MIN_PIXELS = 50


# ----------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------


class _Down(nn.Sequential):
    def __init__(self, cin: int, cout: int, normalize: bool, dropout: float):
        layers: List[nn.Module] = [nn.Conv2d(cin, cout, 4, 2, 1, bias=False)]
        if normalize:
            layers.append(nn.InstanceNorm2d(cout))
        layers.append(nn.LeakyReLU(0.2))
        if dropout:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        layers: List[nn.Module] = [
            nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
            nn.InstanceNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(x), skip], dim=1)


def unet_channels(depth: int, width: int = 64) -> Tuple[int, ...]:
    """Channels of down levels 1..depth: ``width * (1, 2, 4, 8, 8, 8, 8, 8)`` (pix2pix for 64)."""
    return tuple(c * width // 64 for c in UNET_CHANNELS[:depth])


class UNetDecoder(nn.Module):
    """The pix2pix ``GeneratorUNet`` of ACR with ``depth`` levels (8 in the official code).

    Down ``i`` (1-based): Conv 4x4/2 -> InstanceNorm (not on the first and the innermost level) ->
    LeakyReLU(0.2) -> Dropout(0.5) from level 4 on. Up: ConvTranspose 4x4/2 -> InstanceNorm -> ReLU
    -> Dropout(0.5) when the skip level is >= 4 -> concat with the skip. Final: nearest x2 upsample
    -> Conv 3x3 (with bias) to ``out_channels``; no output activation. Inputs must be divisible by
    ``2**depth``. ``width`` scales all channels (64 = the official network; smaller for tests).
    """

    def __init__(self, in_channels: int, out_channels: int = 3, depth: int = 8, dropout: float = 0.5, width: int = 64):
        super().__init__()
        if not 2 <= int(depth) <= len(UNET_CHANNELS):
            raise ValueError(f"unet_depth must be in [2, {len(UNET_CHANNELS)}], got {depth!r}")
        if int(width) < 1:
            raise ValueError(f"unet_width must be >= 1, got {width!r}")
        self.depth = depth = int(depth)
        ch = unet_channels(depth, int(width))
        self.downs = nn.ModuleList()
        cin = in_channels
        for i, c in enumerate(ch):
            level = i + 1
            self.downs.append(_Down(cin, c, normalize=1 < level < depth, dropout=dropout if level >= 4 else 0.0))
            cin = c
        self.ups = nn.ModuleList()
        for j in range(1, depth):
            skip_level = depth - j
            cin = ch[depth - 1] if j == 1 else 2 * ch[skip_level]
            self.ups.append(_Up(cin, ch[skip_level - 1], dropout=dropout if skip_level >= 4 else 0.0))
        self.final = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * ch[0], out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        if h % m or w % m:
            raise ValueError(
                f"ACR decoder: input size {h}x{w} is not divisible by 2**unet_depth = {m}; "
                f"set classifier.crop_size to a multiple of {m} or lower method_options.unet_depth"
            )
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        for j, up in enumerate(self.ups, start=1):
            x = up(x, skips[self.depth - 1 - j])
        return self.final(x)


def default_taps(backbone: nn.Module) -> Tuple[str, str, str]:
    """The three taps of increasing depth the encoder reads: conv4/conv5/conv6 on ResNet-38 (as
    ``Net_recon``), else the last three named taps before ``"out"``."""
    names = [n for n in backbone.tap_channels if n != "out"]
    if {"conv4", "conv5", "conv6"} <= set(names):
        return ("conv4", "conv5", "conv6")
    if len(names) < 3:
        raise ValueError(f"ACR needs three backbone taps; {type(backbone).__name__} has {names}")
    return tuple(names[-3:])  # type: ignore[return-value]


class ACRNet(nn.Module):
    """Backbone + ``fc8``/``fc9`` CAM head; with ``encoder=True`` also the tap reducers and the U-Net
    (the reconstructor). ``forward`` returns ``cams`` (raw), ``logits`` (GAP) and, when asked,
    ``feat`` (the 448-channel encoder feature at the input size)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head_dim: int = 256,
        encoder: bool = False,
        taps: Optional[Sequence[str]] = None,
        dims: Sequence[int] = (64, 128, 256),
        unet_depth: int = 8,
        unet_dropout: float = 0.5,
        unet_width: int = 64,
    ):
        super().__init__()
        self.backbone = backbone
        self.fc8 = nn.Conv2d(backbone.out_channels, head_dim, 1, bias=False)
        self.fc9 = nn.Conv2d(head_dim, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        nn.init.xavier_uniform_(self.fc9.weight)
        self.taps: Tuple[str, ...] = ()
        if encoder:
            self.taps = tuple(taps) if taps is not None else default_taps(backbone)
            if len(self.taps) != len(dims):
                raise ValueError(f"recon_taps {list(self.taps)} and recon_dims {list(dims)} must have the same length")
            missing = [t for t in self.taps if t not in backbone.tap_channels]
            if missing:
                raise ValueError(
                    f"recon_taps {missing} are not taps of the backbone; valid: {list(backbone.tap_channels)}"
                )
            self.reduce = nn.ModuleList(
                nn.Conv2d(backbone.tap_channels[t], int(d), 1, bias=False) for t, d in zip(self.taps, dims)
            )
            self.decoder = UNetDecoder(sum(int(d) for d in dims), 3, unet_depth, unet_dropout, unet_width)

    def forward(self, x: torch.Tensor, with_feat: bool = False) -> Dict[str, torch.Tensor]:
        taps = self.backbone.forward_dict(x)
        cams = self.fc9(F.relu(self.fc8(taps["out"])))
        out = {"cams": cams, "logits": cams.mean(dim=(2, 3))}
        if with_feat:
            size = x.shape[-2:]
            out["feat"] = torch.cat(
                [
                    F.interpolate(conv(taps[t]), size=size, mode="bilinear", align_corners=False)
                    for t, conv in zip(self.taps, self.reduce)
                ],
                dim=1,
            )
        return out


# ----------------------------------------------------------------------------------------------
# pure loss pieces
# ----------------------------------------------------------------------------------------------


def masked_l1(recon: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean(|recon * m - image * m|)`` over all ``B x 3 x H x W`` elements (zeros included),
    ``mask`` ``B x 1 x H x W``; paper ``|V (I - I_hat)|_1``."""
    return (recon.float() * mask - image.float() * mask).abs().mean()


def masked_l1_valid(recon: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`masked_l1` over the images with ``valid`` only; 0 when none is valid."""
    if not bool(valid.any()):
        return recon.float().sum() * 0.0
    return masked_l1(recon[valid], image[valid], mask[valid])


def sample_target_classes(labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One class index per image, uniformly among its labelled classes (``split_label``)."""
    if bool((labels.sum(dim=1) <= 0).any()):
        raise ValueError("ACR needs at least one image-level label per image (classifier.on_unlabelled: skip)")
    return torch.multinomial(labels.float(), 1, generator=generator)[:, 0]


def srf_probability(epoch: int, p0: float = 0.2, p_step: float = 0.01) -> float:
    """Probability that a grid cell is decomposed (code ``randint(0,100) < prob + epoch``,
    i.e. ``(20 + epoch)/100``); the paper's remnant probability is ``q = 1 - p``."""
    return float(min(1.0, max(0.0, p0 + p_step * epoch)))


def srf_grid(
    batch: int, grid: int, p: float, size: Tuple[int, int], device, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """``B x 1 x H x W`` binary map: a ``grid x grid`` Bernoulli(p) draw per image, nearest-upsampled."""
    cells = (torch.rand(batch, 1, grid, grid, device=device, generator=generator) < p).float()
    return F.interpolate(cells, size=size, mode="nearest")


def ru_masks(a_t: torch.Tensor, g: torch.Tensor) -> Dict[str, torch.Tensor]:
    """RU-phase input and validation masks (paper Eqs. 8-10 with remnant grid ``1 - g``).

    ``a_t``: target CAM in [0, 1], ``g``: decomposition grid (1 = the cell is decomposed, 0 = the
    other segment is fed as remnant; ``g = 1`` everywhere = no SRF, Eqs. 3-6).
    ``in_t``/``v_t``: the target segment (plus remnants) and its validation on the non-target
    region; ``in_nt``/``v_nt`` the same for the non-target segment.
    """
    return {
        "in_t": 1.0 - (1.0 - a_t) * g,
        "v_t": (1.0 - a_t) * g,
        "in_nt": 1.0 - a_t * g,
        "v_nt": a_t * g,
    }


def cu_masks(a_t: torch.Tensor, seg_is_target: torch.Tensor, mode: str = "code") -> Dict[str, torch.Tensor]:
    """CU-phase validation masks, detached. ``code``: ``V_t = [A_t == 0]``, ``V_nt = A_t *
    [argmax CAM == t]``; ``paper`` (Eqs. 12-13): ``V_t = 1 - A_t``, ``V_nt = A_t``."""
    a = a_t.detach()
    if mode == "code":
        return {"v_t": (a == 0).float(), "v_nt": a * seg_is_target.float()}
    if mode == "paper":
        return {"v_t": 1.0 - a, "v_nt": a}
    raise ValueError(f"cu_masks must be one of {CU_MASKS}, got {mode!r}")


def target_cam(cams: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``up_bilinear(max_norm(cams) * y, size)[t]`` as ``B x 1 x H x W`` (differentiable)."""
    a = max_norm(cams.float()) * labels[:, :, None, None].float()
    a = a[torch.arange(a.shape[0], device=a.device), target][:, None]
    return F.interpolate(a, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_param_grads(module: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients into ``module``'s parameters (restores the flags afterwards)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _load_part(module: nn.Module, path: str, prefix: str, what: str) -> None:
    from ..engine import load_model_state

    state = load_model_state(Path(path))
    model = state.get("model", {})
    sub = {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
    if not sub:
        raise ValueError(
            f"ACR {what} {path}: no '{prefix}*' weights (method {state.get('method')!r}); it must be a model.pt of an 'acr' run"
        )
    try:
        module.load_state_dict(sub)
    except RuntimeError as e:
        raise ValueError(
            f"ACR {what} {path} does not fit this {prefix.rstrip('.')} (backbone/options differ): {e}"
        ) from e


@METHODS.register("acr")
class ACRMethod(Method):
    """ACR (see the module docstring). Options (``method_options``), defaults = official code:

    ``reconstructor``: ``adversarial`` (both phases every step) | ``pretrain`` (RU only, the
    classifier loaded from ``classifier_init`` and frozen) | ``frozen`` (CU only, the reconstructor
    loaded from ``reconstructor_init`` and frozen) — Table 1's "pre-trained" row is pretrain then
    frozen. ``srf`` (True), ``srf_grid`` (16), ``srf_p0`` (0.20), ``srf_p_step`` (0.01 per epoch).
    RU weights ``ru_weight_t`` (0.5), ``ru_weight_nt`` (0.3), ``ru_cls_weight`` (1.0),
    ``ru_full_weight`` (0.2). CU weights ``cls_weight`` (1.0), ``cu_weight_t`` (0.8),
    ``cu_weight_nt`` (0.3), ``cu_masks`` (``code`` | ``paper``). Architecture ``head_dim`` (256),
    ``head_lr_mult`` (1.0), ``recon_taps`` (None = per backbone), ``recon_dims`` ([64, 128, 256]),
    ``unet_depth`` (8; the crop must be a multiple of ``2**unet_depth``), ``unet_dropout`` (0.5),
    ``unet_width`` (64; channels of the first level, pix2pix = 64).
    """

    name = "acr"
    #: official ``infer``: raw CAM upsampled to the image size, then ReLU (wsss.cam_infer)
    cam_upsample = "raw_then_relu"

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        *,
        reconstructor: str = "adversarial",
        srf: bool = True,
        srf_grid: int = 16,
        srf_p0: float = 0.20,
        srf_p_step: float = 0.01,
        ru_weight_t: float = 0.5,
        ru_weight_nt: float = 0.3,
        ru_cls_weight: float = 1.0,
        ru_full_weight: float = 0.2,
        cls_weight: float = 1.0,
        cu_weight_t: float = 0.8,
        cu_weight_nt: float = 0.3,
        cu_masks: str = "code",
        head_dim: int = 256,
        head_lr_mult: float = 1.0,
        recon_taps: Optional[Sequence[str]] = None,
        recon_dims: Sequence[int] = (64, 128, 256),
        unet_depth: int = 8,
        unet_dropout: float = 0.5,
        unet_width: int = 64,
        classifier_init: Optional[str] = None,
        reconstructor_init: Optional[str] = None,
    ):
        super().__init__()
        if reconstructor not in MODES:
            raise ValueError(f"acr reconstructor must be one of {MODES}, got {reconstructor!r}")
        if cu_masks not in CU_MASKS:
            raise ValueError(f"acr cu_masks must be one of {CU_MASKS}, got {cu_masks!r}")
        if int(srf_grid) < 1:
            raise ValueError(f"acr srf_grid must be >= 1, got {srf_grid!r}")
        if reconstructor == "pretrain" and not classifier_init:
            raise ValueError("acr reconstructor: pretrain needs classifier_init (model.pt of a trained acr classifier)")
        if reconstructor == "frozen" and not reconstructor_init:
            raise ValueError("acr reconstructor: frozen needs reconstructor_init (model.pt of an acr pretrain run)")
        self.num_classes = num_classes
        self.mode = reconstructor
        self.srf, self.srf_grid, self.srf_p0, self.srf_p_step = (
            bool(srf),
            int(srf_grid),
            float(srf_p0),
            float(srf_p_step),
        )
        self.ru_weight_t, self.ru_weight_nt = float(ru_weight_t), float(ru_weight_nt)
        self.ru_cls_weight, self.ru_full_weight = float(ru_cls_weight), float(ru_full_weight)
        self.cls_weight, self.cu_weight_t, self.cu_weight_nt = (
            float(cls_weight),
            float(cu_weight_t),
            float(cu_weight_nt),
        )
        self.cu_mask_mode = cu_masks
        self.head_lr_mult = float(head_lr_mult)

        recon_backbone = copy.deepcopy(backbone)  # same architecture and pretrained init (Net_recon)
        self.classifier = ACRNet(backbone, num_classes, head_dim)
        self.reconstructor = ACRNet(
            recon_backbone,
            num_classes,
            head_dim,
            encoder=True,
            taps=recon_taps,
            dims=recon_dims,
            unet_depth=unet_depth,
            unet_dropout=unet_dropout,
            unet_width=unet_width,
        )
        if classifier_init:
            _load_part(self.classifier, classifier_init, "classifier.", "classifier_init")
        if reconstructor_init:
            _load_part(self.reconstructor, reconstructor_init, "reconstructor.", "reconstructor_init")
        if self.mode == "pretrain":
            self.classifier.requires_grad_(False)
        if self.mode == "frozen":
            self.reconstructor.requires_grad_(False)
        # the same class as the engine's optimiser: SGD until the first step or a resume says
        # otherwise (_sync_recon_optimizer, load_extra_state_dict)
        self.recon_optimizer: Optional[torch.optim.Optimizer] = None
        if self.mode == "adversarial":
            self.recon_optimizer = self._new_recon_optimizer("SGD")

    @classmethod
    def required_files(cls, options: Mapping[str, Any]) -> List[str]:
        """``classifier_init`` / ``reconstructor_init`` where set (the model files of the
        pre-trained-reconstructor ablation), which the workflow trains first."""
        opts = options or {}
        return [str(opts[k]) for k in ("classifier_init", "reconstructor_init") if opts.get(k)]

    # -- parameter groups ----------------------------------------------------------------------
    def _classifier_groups(self) -> List[Dict[str, Any]]:
        c = self.classifier
        return [
            {"name": "backbone", "params": [p for p in c.backbone.parameters() if p.requires_grad], "lr_mult": 1.0},
            {
                "name": "head",
                "params": [p for p in [c.fc8.weight, c.fc9.weight] if p.requires_grad],
                "lr_mult": self.head_lr_mult,
            },
        ]

    def _recon_groups(self) -> List[Dict[str, Any]]:
        """``get_parameter_groups`` of ACR: ConvTranspose weights x10, conv biases x2 (no weight
        decay), everything else x1."""
        r = self.reconstructor
        convt = [m.weight for m in r.decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
        convt_ids = {id(p) for p in convt}
        biases = [m.bias for m in r.decoder.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
        bias_ids = {id(p) for p in biases}
        rest = [p for p in r.parameters() if p.requires_grad and id(p) not in convt_ids and id(p) not in bias_ids]
        groups = [
            {"name": "recon", "params": rest, "lr_mult": 1.0, "decay": True},
            {"name": "recon_bias", "params": biases, "lr_mult": 2.0, "decay": False},
            {"name": "recon_convT", "params": convt, "lr_mult": 10.0, "decay": True},
        ]
        return [g for g in groups if g["params"]]

    def param_groups(self) -> List[Dict[str, Any]]:
        """The engine's optimiser: the classifier (or the reconstructor in ``pretrain`` mode)."""
        if self.mode == "pretrain":
            return [
                {
                    "name": g["name"],
                    "params": g["params"],
                    "lr_mult": g["lr_mult"],
                    **({} if g["decay"] else {"weight_decay": 0.0}),
                }
                for g in self._recon_groups()
            ]
        return self._classifier_groups()

    @property
    def output_stride(self) -> int:
        return self.classifier.backbone.output_stride

    # -- inference -----------------------------------------------------------------------------
    def cam(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.classifier(images)["cams"])

    def raw_cam(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)["cams"]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)["logits"]

    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        raise RuntimeError("acr alternates two optimisers; it is trained through train_step (wsss.engine calls it)")

    # -- the reconstructor's optimiser state (checkpointed by the engine) ------------------------
    def extra_state_dict(self) -> Dict[str, Any]:
        if self.recon_optimizer is None:
            return {}
        return {
            "recon_optimizer": self.recon_optimizer.state_dict(),
            "recon_optimizer_class": type(self.recon_optimizer).__name__,
        }

    def load_extra_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if self.recon_optimizer is None:
            return
        if not state or "recon_optimizer" not in state:
            raise RuntimeError(
                "the checkpoint has no state of ACR's reconstructor optimiser (written by another version?)"
            )
        # checkpoints written before the AdamW switch hold an SGD state without the class name
        self.recon_optimizer = self._new_recon_optimizer(state.get("recon_optimizer_class", "SGD"))
        self.recon_optimizer.load_state_dict(state["recon_optimizer"])

    #: the reconstructor's optimiser follows the engine's (wsss.engine.OPTIMIZERS builds these)
    RECON_OPTIMIZERS = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}

    def _new_recon_optimizer(self, class_name: str) -> torch.optim.Optimizer:
        if class_name not in self.RECON_OPTIMIZERS:
            raise ValueError(
                f"acr: no reconstructor optimiser for the engine's {class_name}; "
                f"valid: {', '.join(sorted(self.RECON_OPTIMIZERS))}"
            )
        return self.RECON_OPTIMIZERS[class_name](self._recon_groups(), lr=0.0)

    def _sync_recon_optimizer(self, engine_optimizer: torch.optim.Optimizer) -> None:
        """The engine's optimiser class and settings (SGD: ``lr``, ``momentum``, ``weight_decay``;
        AdamW: ``lr``, ``betas``, ``eps``, ``weight_decay``) and the same poly factor (the engine's
        first group's ``lr / initial_lr``; 1 when it has no scheduler). A reconstructor optimiser of
        another class is replaced before it has taken a step (the first RU step); after that a
        change of class is an error, not a silent restart of its state."""
        cls_name = type(engine_optimizer).__name__
        if type(self.recon_optimizer).__name__ != cls_name:
            if self.recon_optimizer.state:
                raise RuntimeError(
                    f"acr: the engine's optimiser is {cls_name} but the reconstructor's "
                    f"{type(self.recon_optimizer).__name__} has already stepped"
                )
            self.recon_optimizer = self._new_recon_optimizer(cls_name)
        d = engine_optimizer.defaults
        g0 = engine_optimizer.param_groups[0]
        factor = g0["lr"] / g0["initial_lr"] if g0.get("initial_lr") else 1.0
        for g in self.recon_optimizer.param_groups:
            g["lr"] = d["lr"] * g["lr_mult"] * factor
            for key in ("momentum", "betas", "eps"):
                if key in g and key in d:
                    g[key] = d[key]
            g["weight_decay"] = d.get("weight_decay", 0.0) if g["decay"] else 0.0

    # -- phases --------------------------------------------------------------------------------
    def _target_and_grid(
        self, labels: torch.Tensor, size: Tuple[int, int], epoch: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        target = sample_target_classes(labels)
        if self.srf:
            g = srf_grid(
                labels.shape[0],
                self.srf_grid,
                srf_probability(epoch, self.srf_p0, self.srf_p_step),
                size,
                labels.device,
            )
        else:
            g = torch.ones(labels.shape[0], 1, *size, device=labels.device)
        return target, g

    def ru_losses(
        self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, g: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """RU-phase terms (reconstructor trainable, classifier used without grad)."""
        size = images.shape[-2:]
        with torch.no_grad():
            a_t = target_cam(self.classifier(images)["cams"], labels, target, size)
        m = ru_masks(a_t, g)
        out = self.reconstructor(images, with_feat=True)
        feat = out["feat"]
        b = images.shape[0]
        rec = self.reconstructor.decoder(
            torch.cat([feat.detach(), feat * m["in_t"].to(feat.dtype), feat * m["in_nt"].to(feat.dtype)])
        )
        x_full, x_t, x_nt = rec[:b], rec[b : 2 * b], rec[2 * b :]
        valid = m["in_nt"].flatten(1).sum(1) > VALID_MIN_PIXELS
        return {
            "ru_cls": self.ru_cls_weight * F.multilabel_soft_margin_loss(out["logits"].float(), labels),
            "ru_full": self.ru_full_weight * (x_full.float() - images.float()).abs().mean(),
            "ru_t": self.ru_weight_t * masked_l1(x_t, images, m["v_t"]),
            "ru_nt": self.ru_weight_nt * masked_l1_valid(x_nt, images, m["v_nt"], valid),
        }

    def cu_losses(self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """CU-phase terms (classifier trainable; reconstructor without parameter gradients)."""
        size = images.shape[-2:]
        with torch.no_grad():
            feat = self.reconstructor(images, with_feat=True)["feat"]
        out = self.classifier(images)
        a_t = target_cam(out["cams"], labels, target, size)
        terms = {"cu_cls": self.cls_weight * F.multilabel_soft_margin_loss(out["logits"].float(), labels)}
        if self.cu_weight_t == 0 and self.cu_weight_nt == 0:
            return terms
        with torch.no_grad():
            seg = F.interpolate(out["cams"].float(), size=size, mode="bilinear", align_corners=False).argmax(
                dim=1, keepdim=True
            )
            seg_is_target = seg == target[:, None, None, None]
        m = cu_masks(a_t, seg_is_target, self.cu_mask_mode)
        b = images.shape[0]
        a = a_t.to(feat.dtype)
        with _no_param_grads(self.reconstructor):
            rec = self.reconstructor.decoder(torch.cat([feat * a, feat * (1.0 - a)]))
        terms["cu_t"] = -self.cu_weight_t * masked_l1(rec[:b], images, m["v_t"])
        terms["cu_nt"] = -self.cu_weight_nt * masked_l1(rec[b:], images, m["v_nt"])
        return terms

    def _update(self, terms: Dict[str, torch.Tensor], optimizer, scaler, ctx: StepContext, phase: str) -> float:
        total = sum(terms.values())
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"ACR {phase} phase: non-finite loss at step {ctx.step}: { {k: float(v) for k, v in terms.items()} }"
            )
        scaler.scale(total).backward()
        scaler.step(optimizer)
        return float(total.detach())

    def ru_step(
        self, batch: Dict[str, Any], ctx: StepContext, optimizer, scaler, target=None, g=None
    ) -> Dict[str, float]:
        """Reconstructor-updating phase: one step of ``optimizer`` (the reconstructor's)."""
        images, labels = batch["image"], batch["label"]
        if target is None or g is None:
            target, g = self._target_and_grid(labels, images.shape[-2:], ctx.epoch)
        self.classifier.eval()
        self.reconstructor.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=images.device.type, enabled=scaler.is_enabled()):
            terms = self.ru_losses(images, labels, target, g)
        total = self._update(terms, optimizer, scaler, ctx, "RU")
        return {**{f"loss_{k}": float(v.detach()) for k, v in terms.items()}, "loss_ru_total": total}

    def cu_step(self, batch: Dict[str, Any], ctx: StepContext, optimizer, scaler, target=None) -> Dict[str, float]:
        """Classifier-updating phase: one step of ``optimizer`` (the engine's, the classifier's)."""
        images, labels = batch["image"], batch["label"]
        if target is None:
            target = sample_target_classes(labels)
        self.reconstructor.eval()
        self.classifier.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=images.device.type, enabled=scaler.is_enabled()):
            terms = self.cu_losses(images, labels, target)
        total = self._update(terms, optimizer, scaler, ctx, "CU")
        return {**{f"loss_{k}": float(v.detach()) for k, v in terms.items()}, "loss_cu_total": total}

    def train_step(self, batch: Dict[str, Any], ctx: StepContext, optimizer, scaler) -> Dict[str, float]:
        """One iteration: RU then CU on the same batch and target classes (per ``reconstructor``
        mode), then one ``scaler.update()``."""
        images, labels = batch["image"], batch["label"]
        target, g = self._target_and_grid(labels, images.shape[-2:], ctx.epoch)
        out: Dict[str, float] = {}
        if self.mode == "adversarial":
            self._sync_recon_optimizer(optimizer)
            out.update(self.ru_step(batch, ctx, self.recon_optimizer, scaler, target, g))
            out["lr_recon"] = self.recon_optimizer.param_groups[0]["lr"]
            out.update(self.cu_step(batch, ctx, optimizer, scaler, target))
        elif self.mode == "pretrain":
            out.update(self.ru_step(batch, ctx, optimizer, scaler, target, g))
        else:
            out.update(self.cu_step(batch, ctx, optimizer, scaler, target))
        scaler.update()
        out["loss_total"] = out.get("loss_ru_total", 0.0) + out.get("loss_cu_total", 0.0)
        return out
