"""Inference and evaluation of the segmentation network (KTSE/BECO ``test_step`` + ``test.py``).

Inference of one image (:func:`predict_probs`):

* optional ``test_size`` (h, w): the image is first resized to it (bilinear) - BECO resizes every
  val image to 512x512 (aspect ratio distorted) and scores the upsampled logits on the original
  ground truth; ``None`` (default) keeps the original size;
* for each scale ``s`` of ``scales`` the (resized) image is rescaled (bilinear, size
  ``round(h*s) x round(w*s)``), normalised and run; with ``flip`` its horizontal flip is run in the
  same batch and flipped back;
* every view's logits are resized bilinearly to the original H x W (``align_corners`` of the
  model: False for DeepLab-v2/v3+ as BECO and deeplab-pytorch, True for SEAM's DeepLab-v1 as its
  ``eval_final_voc.py``) and fused: ``fusion="mean"`` (default) averages the softmax probabilities of all views;
  ``fusion="max"`` takes the pixel-wise maximum of the logits and then the softmax (BECO
  ``test_msc``; BECO takes the max on the stride-8 grid of the 512x512 input before upsampling,
  here it is taken after upsampling, and BECO's scale list [1.0, 0.75, 1.0, 1.25] is
  [0.75, 1.0, 1.25] since a repeated view does not change a maximum); ``fusion="logit_mean"``
  averages the logits and then takes the softmax (SEAM / HFPL ``eval_final_voc.py``);
* optional DeepLab test-time CRF on the fused probabilities
  (:func:`wsss.refine.crf.deeplab_crf`, imported lazily; ``crf_params`` are its keyword options;
  ``crf_image="parity"`` feeds it BECO's image - RGB minus (122.675, 116.669, 104.008) cast to
  uint8, i.e. truncated and wrapped modulo 256 as x86 numpy does - instead of the raw image);
  the label is the argmax.

Predictions are written as palette PNGs ``<out_dir>/<id>.png`` (class indices, VOC colours), so
they are both viewable and readable back with :func:`wsss.io.read_label_png`.
:func:`predict_to_dir` skips ids whose PNG exists (resumable; PNGs are written atomically), so
shards of an id list can run as parallel CPU jobs; :func:`evaluate_predictions` (in
:mod:`wsss.seg.scoring`, no torch; re-exported here) reads them back and scores them with
:mod:`wsss.metrics` (mIoU, per-class IoU / precision / recall, J&F with
:class:`~wsss.metrics.BoundaryAccumulator`), writing a one-row metrics CSV (with the package version
and config hash), a per-class CSV and an image | ground truth | prediction gallery.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.base import SegDataset
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, rescale, resize
from ..io import voc_palette, write_label_png
from ..workflow.journal import NoJournal
from ..workflow.per_image import todo_ids
from .params import CRF_IMAGES, FUSIONS
from .scoring import evaluate_predictions, prediction_path, read_prediction, write_gallery  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

#: Mean BECO subtracts before handing the image to the CRF (``MeanSub``, RGB order).
BECO_CRF_MEAN = (122.675, 116.669, 104.008)


@dataclass(frozen=True)
class InferenceSettings:
    """How one image is predicted; see the module docstring."""

    scales: Tuple[float, ...] = (1.0,)
    flip: bool = False
    fusion: str = "mean"
    test_size: Optional[Tuple[int, int]] = None
    crf: bool = False
    crf_params: Mapping[str, Any] = field(default_factory=dict)
    crf_image: str = "raw"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.crf_image not in CRF_IMAGES:
            raise ValueError(f"crf_image must be one of {CRF_IMAGES}, got {self.crf_image!r}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {self.scales!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "InferenceSettings":
        """From a ``deeplab`` section with every key (:func:`wsss.config.validate_section` fills one)."""
        ts = params["test_size"]
        return cls(
            scales=tuple(float(s) for s in params["test_scales"]),
            flip=bool(params["flip"]),
            fusion=params["fusion"],
            test_size=None if ts is None else (int(ts[0]), int(ts[1])),
            crf=bool(params["crf"]),
            crf_params=dict(params["crf_params"]),
            crf_image=params["crf_image"],
        )


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out["out"] if isinstance(out, Mapping) else out


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module, img: np.ndarray, settings: InferenceSettings, device: Optional[torch.device] = None
) -> np.ndarray:
    """Fused class probabilities ``C x H x W`` (float32) of one uint8 RGB image (model in eval mode)."""
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    h, w = img.shape[:2]
    # the network's own upsampling convention (SEAM's DeepLab-v1: align_corners=True in eval_final_voc.py too)
    align_corners = bool(getattr(model, "align_corners", False))
    base = img if settings.test_size is None else resize(img, tuple(settings.test_size), Image.BILINEAR)
    fused: Optional[torch.Tensor] = None
    n_views = 0
    for s in settings.scales:
        view = base if s == 1.0 else rescale(base, s, Image.BILINEAR)
        x = torch.from_numpy(np.ascontiguousarray(normalize(view, settings.mean, settings.std).transpose(2, 0, 1)))[
            None
        ]
        if settings.flip:
            x = torch.cat([x, x.flip(-1)])
        logits = _logits(model, x.to(device)).float()
        if settings.flip:
            logits = torch.cat([logits[:1], logits[1:].flip(-1)])
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=align_corners)
        for lg in logits:
            if settings.fusion == "max":
                fused = lg if fused is None else torch.maximum(fused, lg)
            else:  # mean of the softmax probabilities, or of the logits (logit_mean)
                v = torch.softmax(lg, dim=0) if settings.fusion == "mean" else lg
                fused = v if fused is None else fused + v
            n_views += 1
    if settings.fusion == "mean":
        probs = fused / n_views
    else:
        probs = torch.softmax(fused / n_views if settings.fusion == "logit_mean" else fused, dim=0)
    return probs.cpu().numpy().astype(np.float32, copy=False)


def beco_crf_image(img: np.ndarray) -> np.ndarray:
    """BECO's CRF input: ``uint8(RGB - mean)`` with negative values wrapped (see module docstring)."""
    x = img.astype(np.float32) - np.asarray(BECO_CRF_MEAN, np.float32)
    return np.ascontiguousarray((np.trunc(x).astype(np.int64) % 256).astype(np.uint8))


def predict_label(
    model: torch.nn.Module, img: np.ndarray, settings: InferenceSettings, device: Optional[torch.device] = None
) -> np.ndarray:
    """uint8 ``H x W`` label map of one image (argmax of the fused, optionally CRF-refined probabilities)."""
    probs = predict_probs(model, img, settings, device)
    if settings.crf:
        from ..refine.crf import deeplab_crf  # lazy: pydensecrf is only needed with crf on

        crf_img = beco_crf_image(img) if settings.crf_image == "parity" else img
        out = np.asarray(deeplab_crf(crf_img, probs, **dict(settings.crf_params)))
        if out.ndim == 3:
            probs = out
        elif out.ndim == 2:
            return out.astype(np.uint8)
        else:
            raise ValueError(f"deeplab_crf returned an array of shape {out.shape}; expected C x H x W probabilities")
    return probs.argmax(axis=0).astype(np.uint8)


class _ImageSet(Dataset):
    def __init__(self, ds: SegDataset, ids: Sequence[str]):
        self.ds, self.ids = ds, list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], self.ds.load_image(self.ids[i])


def _as_is(item):
    """Collate function keeping a sample (id, uint8 image) as it is (no tensor conversion)."""
    return item


def predict_to_dir(
    model: torch.nn.Module,
    ds: SegDataset,
    ids: Sequence[str],
    out_dir: str | Path,
    settings: InferenceSettings,
    *,
    device: Optional[torch.device] = None,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "predict",
    journal: Any = None,
) -> Dict[str, int]:
    """Write ``<out_dir>/<id>.png`` for every id (all of them, except those an interrupted attempt of
    the same job recorded in ``journal``, a :class:`wsss.workflow.journal.ShardJournal`; None: no
    resume); returns ``{"written": n, "skipped": m}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    journal = journal if journal is not None else NoJournal()
    todo, skipped = todo_ids(ids, journal, lambda i: prediction_path(out_dir, i).exists())
    if skipped:
        log.info(
            "%d of %d predictions already written by this job in %s; computing %d",
            skipped,
            len(ids),
            out_dir,
            len(todo),
        )
    if not todo:
        return {"written": 0, "skipped": skipped}
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    palette = voc_palette()
    loader = DataLoader(_ImageSet(ds, todo), batch_size=None, num_workers=num_workers, collate_fn=_as_is)
    try:
        for image_id, img in tqdm(loader, total=len(todo), desc=desc, disable=not progress, mininterval=2.0):
            label = predict_label(model, img, settings, device)
            write_label_png(prediction_path(out_dir, image_id), label, palette=palette)
            journal.record(image_id)
    finally:
        journal.close()
    return {"written": len(todo), "skipped": skipped}
