"""Multi-scale CAM inference into HDF5 shards (IRN ``step/make_cam.py``; docs/official_code.md).

Per image and scale ``s`` (default 1.0, 0.5, 1.5, 2.0): the image is rescaled (PIL bicubic), stacked
with its horizontal flip (the flip pair is one batch of 2), and the method's ReLU'd CAM is fused as
``cam[0] + flip(cam[1])``. Over scales the maps are summed after bilinear resizing
(``align_corners=False``) to the strided size ``ceil(H/4) x ceil(W/4)`` (``cam``) and to
``ceil(H/os)*os`` cropped to ``H x W`` (``high_res``; ``os`` = the backbone's output stride, 16 in
IRN). Only the image's ground-truth classes are kept (``keys``), each normalised per class:
``max`` (IRN: ``m / (max + 1e-5)``) or ``minmax`` (AEFT/ACR/KTSE ``max_norm``:
``relu(m - min - 1e-5) / (max - min + 1e-5)``).

Where the ReLU sits relative to the resizing is ``cam.upsample`` (:data:`UPSAMPLES`):

* ``relu_then_raw`` (IRN ``make_cam``): the method's ReLU'd CAM (:meth:`Method.cam`) at feature
  resolution is resized on the strided grid described above (``high_res`` on the
  ``ceil(H/os)*os`` grid, then cropped);
* ``raw_then_relu`` (the ``infer_multi``/``infer`` of the PSA-derived AEFT, KTSE and ACR code): the
  raw, pre-ReLU CAM (:meth:`Method.raw_cam`) of each view is resized bilinearly
  (``align_corners=False``) straight to ``H x W`` (``high_res``) and to ``ceil(H/4) x ceil(W/4)``
  (``cam``), ReLU'd there, and the flip undone before the views are summed;
* ``auto``: the method's own default, its attribute ``cam_upsample`` (:func:`resolve_upsample`).

Speed options (``cam.precision``, ``cam.channels_last``; ``bench/cam_throughput.py``): each scale's
image/flip pair is one batch on the device (scales differ in size, and padding them into one batch
would change the CAM near the borders); the forward pass can run under autocast (``bf16`` or
``fp16``; the maps are fused in float32; ``tests/test_cam_infer.py`` bounds the difference to
``fp32``) with the network and views in ``channels_last`` memory format; on a GPU the DataLoader
workers prepare the next images' views in pinned memory while the device computes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .cams import CamShardWriter
from .data.base import SegDataset
from .data.classification import MultiScaleSet, identity_collate, select_labelled
from .methods.base import Method
from .workflow.adapter import shard_ids  # noqa: F401 (the torch-free stages import it from there)

log = logging.getLogger(__name__)

NORMALISATIONS = ("max", "minmax")
#: ``cam.precision``: the dtype of the forward pass (autocast), maps are fused in float32
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Orders of ReLU and resizing (module docstring); ``auto`` in the config picks the method's own.
UPSAMPLES = ("relu_then_raw", "raw_then_relu")
UPSAMPLE_AUTO = "auto"


def resolve_upsample(method: Method, upsample: str = UPSAMPLE_AUTO) -> str:
    """``upsample`` itself, or for ``auto`` the method's default ``method.cam_upsample`` (the order
    of its official inference code; ``relu_then_raw`` where a method does not say)."""
    if upsample == UPSAMPLE_AUTO:
        upsample = getattr(method, "cam_upsample", "relu_then_raw")
    if upsample not in UPSAMPLES:
        raise ValueError(f"unknown cam.upsample {upsample!r}; valid: {', '.join(UPSAMPLES + (UPSAMPLE_AUTO,))}")
    return upsample


def normalise_maps(maps: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-class normalisation of ``K x h x w`` maps (see module docstring)."""
    if maps.shape[0] == 0:
        return maps
    flat = maps.flatten(1)
    mx = flat.max(dim=1).values[:, None, None]
    if mode == "max":
        return maps / (mx + 1e-5)
    if mode == "minmax":
        mn = flat.min(dim=1).values[:, None, None]
        return F.relu(maps - mn - 1e-5) / (mx - mn + 1e-5)
    raise ValueError(f"unknown CAM normalisation {mode!r}; valid: {', '.join(NORMALISATIONS)}")


def strided_size(size: Tuple[int, int], stride: int) -> Tuple[int, int]:
    return (math.ceil(size[0] / stride), math.ceil(size[1] / stride))


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown cam.precision {precision!r}; valid: {', '.join(PRECISIONS)}")


def _forward(fn, view: torch.Tensor, device: torch.device, precision: str, channels_last: bool) -> torch.Tensor:
    """``fn(view)`` on ``device`` (non-blocking copy), under autocast for ``precision`` != fp32 and
    in channels_last memory format if asked; returned as float32."""
    v = view.to(device, non_blocking=True)
    if channels_last:
        v = v.contiguous(memory_format=torch.channels_last)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return fn(v).float()
    with torch.autocast(device.type, dtype=dtype):
        return fn(v).float()


@torch.no_grad()
def fused_cams(
    method: Method,
    views: Sequence[torch.Tensor],
    size: Tuple[int, int],
    keys: np.ndarray,
    normalisation: str,
    device: torch.device,
    upsample: str = "relu_then_raw",
    *,
    precision: str = "fp32",
    channels_last: bool = False,
):
    """Fuse the multi-scale (flip-pair) views of one image into (``cam``, ``high_res``) numpy maps;
    ``upsample``: where the ReLU sits (module docstring; ``auto`` = the method's default);
    ``precision``, ``channels_last``: the forward pass (module docstring)."""
    check_precision(precision)
    fwd = dict(device=device, precision=precision, channels_last=channels_last)
    if resolve_upsample(method, upsample) == "raw_then_relu":
        return _fused_raw_then_relu(method, views, size, keys, normalisation, fwd)
    h, w = size
    os_ = method.output_stride
    low_size = strided_size(size, 4)
    up = strided_size(size, os_)
    up_size = (up[0] * os_, up[1] * os_)
    keys_t = torch.as_tensor(keys, dtype=torch.long, device=device)
    low = torch.zeros((len(keys),) + low_size, device=device)
    high = torch.zeros((len(keys),) + up_size, device=device)
    for v in views:
        out = _forward(method.cam, v, **fwd)
        o = out[0] + out[1].flip(-1) if out.shape[0] == 2 else out[0]
        o = o[keys_t][None]
        low += F.interpolate(o, low_size, mode="bilinear", align_corners=False)[0]
        high += F.interpolate(o, up_size, mode="bilinear", align_corners=False)[0]
    high = high[:, :h, :w]
    low = normalise_maps(low, normalisation)
    high = normalise_maps(high, normalisation)
    return low.cpu().numpy(), high.cpu().numpy()


@torch.no_grad()
def _fused_raw_then_relu(
    method: Method,
    views: Sequence[torch.Tensor],
    size: Tuple[int, int],
    keys: np.ndarray,
    normalisation: str,
    fwd: Mapping[str, Any],
):
    """``raw_then_relu`` fusion: per view ``relu(bilinear(raw CAM, map size))``, flip undone, summed."""
    device = fwd["device"]
    low_size = strided_size(size, 4)
    keys_t = torch.as_tensor(keys, dtype=torch.long, device=device)
    low = torch.zeros((len(keys),) + low_size, device=device)
    high = torch.zeros((len(keys),) + tuple(size), device=device)
    for v in views:
        raw = _forward(method.raw_cam, v, **fwd)[:, keys_t]
        for acc, s in ((low, low_size), (high, tuple(size))):
            up = F.relu(F.interpolate(raw, s, mode="bilinear", align_corners=False))
            acc += up[0] + up[1].flip(-1) if up.shape[0] == 2 else up[0]
    low = normalise_maps(low, normalisation)
    high = normalise_maps(high, normalisation)
    return low.cpu().numpy(), high.cpu().numpy()


def infer_cams(
    method: Method,
    ds: SegDataset,
    ids: Sequence[str],
    labels: Mapping[str, np.ndarray],
    out_path: Path,
    *,
    scales: Sequence[float],
    flip: bool,
    normalisation: str,
    resolved_config: Mapping[str, Any],
    upsample: str = UPSAMPLE_AUTO,
    precision: str = "fp32",
    channels_last: bool = False,
    shard_index: int = 0,
    num_shards: int = 1,
    device: torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    skipped: Sequence[str] = (),
) -> Path:
    """Compute CAMs of ``ids`` and write them to the HDF5 shard ``out_path`` (atomically).

    ``skipped``: ids of this shard left out on purpose (unlabelled images), recorded in the shard
    (:attr:`wsss.cams.CamStore.skipped`) so later stages leave them out too. An id of ``ids``
    without any image-level label raises :class:`wsss.io.DataError` (its CAM would have no
    channel) or without a row in ``labels``. ``upsample``, ``precision``, ``channels_last``:
    ``cam.upsample``, ``cam.precision``, ``cam.channels_last`` (module docstring)."""
    check_precision(precision)
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown CAM normalisation {normalisation!r}; valid: {', '.join(NORMALISATIONS)}")
    upsample = resolve_upsample(method, upsample)
    log.info(
        "CAM inference: %s, %s normalisation, %s%s",
        upsample,
        normalisation,
        precision,
        ", channels_last" if channels_last else "",
    )
    select_labelled(ids, labels, "error")  # names missing and unlabelled images
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method.to(device).eval()
    if channels_last:
        method.to(memory_format=torch.channels_last)
    dataset = MultiScaleSet(ds, ids, labels, scales, flip)
    # workers prepare the next images' views (pinned for an asynchronous copy to a GPU)
    loader = DataLoader(
        dataset,
        batch_size=1,
        num_workers=num_workers,
        collate_fn=identity_collate,
        pin_memory=device.type == "cuda",
    )
    with CamShardWriter(
        out_path,
        config=resolved_config,
        scales=scales,
        normalisation=normalisation,
        shard_index=shard_index,
        num_shards=num_shards,
        num_classes=ds.num_fg_classes,
        skipped=skipped,
    ) as writer:
        for (sample,) in tqdm(
            loader, desc=f"CAM shard {shard_index + 1}/{num_shards}", disable=not progress, mininterval=2.0
        ):
            keys = np.nonzero(sample["label"])[0]
            low, high = fused_cams(
                method,
                sample["views"],
                tuple(sample["size"]),
                keys,
                normalisation,
                device,
                upsample,
                precision=precision,
                channels_last=channels_last,
            )
            writer.add(sample["id"], keys, low, high)
    log.info("wrote %d CAMs to %s", len(ids), out_path)
    return Path(out_path)
