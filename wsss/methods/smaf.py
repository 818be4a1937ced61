"""SMAF: self-training on fused multi-scale attention (Yang, Zhu, Zhang, ICME 2023).

Paper: *A Self-Training Framework Based on Multi-Scale Attention Fusion for Weakly Supervised
Semantic Segmentation* (seed paper 004); official code ``bupt-ai-cz/SMAF`` (``gen_fused_cam.py``,
``models/adaptation_modelv2.py::CustomModel.step``; commit ``dd2405d``).
Options, equations and paper/code deviations: ``docs/methods/smaf.md``.

* **Teacher**: a trained classifier of any registered method (``teacher_path`` = a ``model.pt``
  written by :func:`wsss.engine.train`; its classifier config is read from that file or given as
  ``teacher_config``), built with :func:`wsss.methods.build_classifier` and frozen (eval mode, no
  gradients). Per training batch it runs at scales ``0.5, 1, 1.5, 2`` (bicubic) with horizontal
  flips; its ReLU'd CAMs (``Method.cam``, paper Eq. 2) are flipped back, resized to the loss
  resolution and summed (Eq. 6).
* **Denoising**: channels of classes absent from the image labels are zeroed; each class map is
  divided by its maximum (+1e-5) (Eq. 5).
* **Reactivation** (Eq. 8): a background channel of constant ``thr = 0.2`` is appended and every
  pixel is divided by its maximum over the channels (the arg-max channel becomes 1).
* **Student loss** (``student_loss``): for a method with a background channel (EPS, the official
  setting) the code's ``100 * MSE(softmax(cam), R)`` over all ``C + 1`` channels, ``R`` the
  reactivated target with its background channel (``softmax_bg``); otherwise (``relu_fg``):
* **Student**: the same method, initialised from the teacher's weights, trained with
  ``L = cls_weight * BCE + alpha * L_mac`` (Eq. 1, alpha = 100), ``L_mac`` = mean squared error between
  the reactivated target and the student's max-normalised ReLU'd CAM (Eq. 9) upsampled to
  ``crop / 4`` (``align_corners=True``), over the image's present classes.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import build_classifier, build_method
from .base import METHODS, Method, StepContext

#: scales and background threshold of the official scripts
SCALES = (0.5, 1.0, 1.5, 2.0)


# ----------------------------------------------------------------------------------------------
# pure pieces
# ----------------------------------------------------------------------------------------------


def rescale_images(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Bicubic (antialiased when shrinking, like PIL) rescale of a normalised batch; size rounded."""
    if scale == 1.0:
        return images
    h, w = images.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=scale < 1.0)


def fuse_multiscale(
    cam_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    size: Tuple[int, int],
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """Sum over scales (and flips) of ``cam_fn`` maps resized to ``size`` (bilinear,
    ``align_corners=False``), ``B x C x h x w`` float32 (paper Eq. 6, ``gen_fused_cam.py``).
    ``chunk`` limits the images per ``cam_fn`` call."""
    b = images.shape[0]
    step = b if not chunk else int(chunk)
    out: Optional[torch.Tensor] = None
    for start in range(0, b, step):
        x = images[start : start + step]
        n = x.shape[0]
        acc: Optional[torch.Tensor] = None
        for s in scales:
            v = rescale_images(x, float(s))
            if flip:
                c = cam_fn(torch.cat([v, v.flip(-1)])).float()
                c = c[:n] + c[n:].flip(-1)
            else:
                c = cam_fn(v).float()
            c = F.interpolate(c, size=size, mode="bilinear", align_corners=False)
            acc = c if acc is None else acc + c
        out = acc if out is None else torch.cat([out, acc])
    return out


def denoise_and_normalise(fused: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero the absent classes (denoising by image labels) and divide each map by its max + eps
    (Eq. 5): ``F = M * y / (max(M * y) + eps)``."""
    m = fused * labels[:, :, None, None].to(fused.dtype)
    return m / (m.flatten(2).max(dim=2).values[..., None, None] + eps)


def reactivate(fused_norm: torch.Tensor, bg_threshold: float = 0.2) -> torch.Tensor:
    """Reactivation (Eq. 8): with a background channel of ``bg_threshold``, every pixel's channels are
    divided by their maximum; returns the foreground channels ``B x C x h x w``."""
    bg = torch.full_like(fused_norm[:, :1], float(bg_threshold))
    r = torch.cat([fused_norm, bg], dim=1)
    r = r / r.max(dim=1, keepdim=True).values
    return r[:, :-1]


def student_maps(cams: torch.Tensor, size: Tuple[int, int], eps: float = 1e-5) -> torch.Tensor:
    """The student's attention ``M_o``: ReLU'd CAM bilinearly resized to ``size``
    (``align_corners=True``) and divided by its per-class max + eps (differentiable)."""
    m = F.interpolate(F.relu(cams.float()), size=size, mode="bilinear", align_corners=True)
    return m / (m.flatten(2).max(dim=2).values[..., None, None] + eps)


def mac_loss(student: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-scale attention consistency (Eq. 9): squared error over the present classes, divided
    by all ``B x C x h x w`` elements (absent classes contribute 0)."""
    mask = labels[:, :, None, None].to(student.dtype)
    return (((student - target) ** 2) * mask).sum() / student.numel()


def reactivate_with_background(
    fused_norm: torch.Tensor, bg_threshold: float = 0.2, bg_index: int = -1, reactivation: bool = True
) -> torch.Tensor:
    """The official code's target over all ``C + 1`` channels (``adaptation_modelv2.py``, ``step``):
    the denoised, normalised foreground maps with a constant background channel ``bg_threshold``
    inserted at ``bg_index`` (-1 or C: last, as EPS), each pixel divided by its maximum over the
    channels (Eq. 8); ``reactivation=False`` skips the division."""
    bg = torch.full_like(fused_norm[:, :1], float(bg_threshold))
    c = fused_norm.shape[1]
    idx = c if bg_index in (-1, c) else int(bg_index)
    r = torch.cat([fused_norm[:, :idx], bg, fused_norm[:, idx:]], dim=1)
    return r / r.max(dim=1, keepdim=True).values if reactivation else r


def softmax_student_loss(full_cam: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official student loss (``step``): the student's raw ``C + 1`` map resized bilinearly
    (``align_corners=True``) to the target's size, softmax over the channels, mean squared error
    against the ``C + 1`` target over all ``B x (C+1) x h x w`` elements."""
    m = F.interpolate(full_cam.float(), size=target.shape[-2:], mode="bilinear", align_corners=True)
    return F.mse_loss(F.softmax(m, dim=1), target)


#: SMAF student formulations (``student_loss``); ``auto`` picks ``softmax_bg`` for students with a
#: background channel protocol (``full_cam`` + ``background_channel``: EPS), ``relu_fg`` otherwise
STUDENT_LOSSES = ("auto", "softmax_bg", "relu_fg")


def has_background_channel(method: Any) -> bool:
    """Whether a method exposes the raw ``C + 1`` map and its background index (EPS)."""
    return callable(getattr(method, "full_cam", None)) and isinstance(getattr(method, "background_channel", None), int)


def epochs_for_iterations(iterations: int, n_images: int, batch_size: int, drop_last: bool = True) -> int:
    """Epochs of the engine that cover ``iterations`` steps (official: 20,000 at batch 8)."""
    steps = n_images // batch_size if drop_last else math.ceil(n_images / batch_size)
    if steps < 1:
        raise ValueError(f"{n_images} images give no batch of {batch_size}")
    return max(1, round(iterations / steps))


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------


def _read_teacher(
    teacher_path: str, teacher_config: Optional[Mapping[str, Any]]
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    from ..engine import load_model_state

    state = load_model_state(Path(teacher_path))
    if "model" not in state:
        raise ValueError(
            f"SMAF teacher {teacher_path} has no 'model' weights; it must be a model.pt written by wsss.engine.train"
        )
    if teacher_config is None:
        teacher_config = (state.get("config") or {}).get("classifier")
        if not teacher_config:
            raise ValueError(
                f"SMAF teacher {teacher_path} records no classifier config; pass method_options.teacher_config"
            )
    tcfg = dict(teacher_config)
    for key in ("method", "backbone"):
        if key not in tcfg:
            raise ValueError(f"SMAF teacher_config needs '{key}' (the teacher experiment's classifier section)")
    if state.get("method") and state["method"] != tcfg["method"]:
        raise ValueError(
            f"SMAF teacher {teacher_path} was trained with method {state['method']!r}, teacher_config says {tcfg['method']!r}"
        )
    return state, tcfg


@METHODS.register("smaf")
class SMAFMethod(Method):
    """SMAF self-training (see the module docstring).

    Options (``method_options``): ``teacher_path`` (required), ``teacher_config`` (default: the
    classifier section recorded in the teacher file), ``scales`` ([0.5, 1, 1.5, 2]), ``flip``
    (True), ``reactivation`` (True), ``bg_threshold`` (0.2), ``alpha`` (100), ``cls_weight`` (1.0;
    0 = official code), ``target_stride`` (4: loss at crop/4), ``teacher_batch`` (None = whole
    batch per teacher call), ``student_loss`` (``auto``: ``softmax_bg``, the official loss over
    the ``C + 1`` softmax, for a student with a background channel (EPS); ``relu_fg``, the paper's
    max-normalised ReLU'd CAMs of the present classes, otherwise). The experiment's ``classifier.backbone`` builds the student's backbone
    and must match the teacher's.
    """

    name = "smaf"

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        *,
        teacher_path: Optional[str] = None,
        teacher_config: Optional[Mapping[str, Any]] = None,
        scales: Sequence[float] = SCALES,
        flip: bool = True,
        reactivation: bool = True,
        bg_threshold: float = 0.2,
        alpha: float = 100.0,
        cls_weight: float = 1.0,
        target_stride: int = 4,
        teacher_batch: Optional[int] = None,
        student_loss: str = "auto",
    ):
        super().__init__()
        if student_loss not in STUDENT_LOSSES:
            raise ValueError(f"smaf student_loss must be one of {', '.join(STUDENT_LOSSES)}, got {student_loss!r}")
        if not teacher_path:
            raise ValueError("method smaf needs method_options.teacher_path (the teacher's model.pt)")
        scales = tuple(float(s) for s in scales)
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"smaf scales must be positive numbers, got {list(scales)}")
        if int(target_stride) < 1:
            raise ValueError(f"smaf target_stride must be >= 1, got {target_stride!r}")
        if teacher_batch is not None and int(teacher_batch) < 1:
            raise ValueError(f"smaf teacher_batch must be >= 1, got {teacher_batch!r}")
        self.num_classes = num_classes
        self.teacher_path = str(teacher_path)
        self.scales, self.flip = scales, bool(flip)
        self.reactivation, self.bg_threshold = bool(reactivation), float(bg_threshold)
        self.alpha, self.cls_weight = float(alpha), float(cls_weight)
        self.target_stride = int(target_stride)
        self.teacher_batch = None if teacher_batch is None else int(teacher_batch)

        state, tcfg = _read_teacher(self.teacher_path, teacher_config)
        self.teacher_config = tcfg
        self.student = build_method(
            tcfg["method"], num_classes=num_classes, backbone=backbone, **dict(tcfg.get("method_options") or {})
        )
        try:
            self.student.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(
                f"SMAF: the student (this experiment's classifier.backbone/backbone_options with method "
                f"{tcfg['method']!r}) does not fit the teacher {self.teacher_path}: {e}"
            ) from e
        if student_loss == "auto":
            student_loss = "softmax_bg" if has_background_channel(self.student) else "relu_fg"
        elif student_loss == "softmax_bg" and not has_background_channel(self.student):
            raise ValueError(
                f"smaf student_loss softmax_bg needs a student with a background channel (e.g. eps); "
                f"method {tcfg['method']!r} has none: use relu_fg"
            )
        self.student_loss = student_loss
        self._teacher: List[Method] = []  # built on the first training step; not a submodule (not saved)
        self._fingerprint: Optional[str] = None

    @classmethod
    def required_files(cls, options: Mapping[str, Any]) -> List[str]:
        """``[teacher_path]``: the teacher's ``model.pt`` (another experiment's classifier), which
        the workflow trains first."""
        path = (options or {}).get("teacher_path")
        if not path:
            raise ValueError("config key 'classifier.method_options.teacher_path' is required for method smaf")
        return [str(path)]

    # -- delegation ----------------------------------------------------------------------------
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.student.param_groups()

    def cam(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.cam(images)

    def raw_cam(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.raw_cam(images)

    @property
    def cam_upsample(self) -> str:
        """The student's CAM inference order (its CAM is what inference fuses)."""
        return self.student.cam_upsample

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.logits(images)

    def batch_size_for_epoch(self, epoch: int, base: int) -> int:
        return self.student.batch_size_for_epoch(epoch, base)

    def schedule_max_step(self, num_images: int, epochs: int) -> Optional[int]:
        return self.student.schedule_max_step(num_images, epochs)

    @property
    def output_stride(self) -> int:
        return self.student.output_stride

    # -- resume safety: a checkpoint belongs to one teacher file --------------------------------
    def teacher_fingerprint(self) -> str:
        """sha256 of the teacher file (the resolved config names only its path)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            with open(self.teacher_path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def extra_state_dict(self) -> Dict[str, Any]:
        return {"teacher_sha256": self.teacher_fingerprint()}

    def load_extra_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """Refuse to resume a student trained against another teacher file (e.g. a retrained teacher)."""
        saved = (state or {}).get("teacher_sha256")
        if saved != self.teacher_fingerprint():
            raise RuntimeError(
                f"the SMAF checkpoint was trained against another teacher than {self.teacher_path} "
                f"(sha256 {saved} != {self.teacher_fingerprint()})"
            )

    # -- teacher -------------------------------------------------------------------------------
    def teacher(self, device: torch.device) -> Method:
        """The frozen teacher (built from ``teacher_path`` on first use, eval mode, no gradients)."""
        if not self._teacher:
            state, tcfg = _read_teacher(self.teacher_path, self.teacher_config)
            c = {
                "method": tcfg["method"],
                "method_options": dict(tcfg.get("method_options") or {}),
                "backbone": tcfg["backbone"],
                "pretrained": "none",
                "backbone_options": dict(tcfg.get("backbone_options") or {}),
            }
            t = build_classifier({"classifier": c}, self.num_classes, pretrained="none")
            t.load_state_dict(state["model"])
            t.requires_grad_(False)
            self._teacher.append(t)
        t = self._teacher[0]
        t.to(device).eval()
        return t

    def target(self, images: torch.Tensor, labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """The refined multi-scale attention target (no grad): ``B x C x h x w`` (``relu_fg``) or
        ``B x (C+1) x h x w`` with the student's background channel (``softmax_bg``)."""
        teacher = self.teacher(images.device)
        with torch.no_grad():
            fused = fuse_multiscale(teacher.cam, images, self.scales, self.flip, size, self.teacher_batch)
            f = denoise_and_normalise(fused, labels.float())
            if self.student_loss == "softmax_bg":
                return reactivate_with_background(
                    f, self.bg_threshold, self.student.background_channel, self.reactivation
                )
            return reactivate(f, self.bg_threshold) if self.reactivation else f

    def losses(self, batch: Dict[str, Any], ctx: StepContext) -> Dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        h, w = images.shape[-2:]
        size = (max(1, h // self.target_stride), max(1, w // self.target_stride))
        target = self.target(images, labels, size)
        if self.student_loss == "softmax_bg":
            full = self.student.full_cam(images)
            with torch.autocast(device_type=images.device.type, enabled=False):
                terms = {"mac": self.alpha * softmax_student_loss(full, target)}
                if self.cls_weight > 0:
                    bg = self.student.background_channel
                    keep = [k for k in range(full.shape[1]) if k != bg]
                    logits = full.float().mean(dim=(2, 3))[:, keep]
                    terms["cls"] = self.cls_weight * F.multilabel_soft_margin_loss(logits, labels.float())
            return terms
        logits = None
        if callable(getattr(self.student, "features_and_cams", None)):
            out = self.student.features_and_cams(images)
            cams = out["cams"]
            logits = out.get("logits")
            if logits is None:
                logits = cams.mean(dim=(2, 3))
        else:  # Method.cam is ReLU'd already; the logits need a second forward pass
            cams = self.student.cam(images)
            if self.cls_weight > 0:
                logits = self.student.logits(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            terms = {"mac": self.alpha * mac_loss(student_maps(cams, size), target, labels.float())}
            if self.cls_weight > 0:
                terms["cls"] = self.cls_weight * F.multilabel_soft_margin_loss(logits.float(), labels.float())
        return terms
