"""Benchmark: CAM inference throughput, IRN's per-view loop beside the workflow's inference.

Both compute the same multi-scale CAMs (scales 1, 0.5, 1.5, 2 with flips, ``max`` normalisation,
the image's classes) with the same network on the same images (``--images`` random 500 x 375
RGB images, VOC's typical size):

* **reference**: IRN's ``step/make_cam.py`` formulation (jiwoon-ahn/irn): per image, per scale a
  PIL-bicubic rescale, ImageNet normalisation, the image/flip pair as one batch, ``cam[0] +
  flip(cam[1])`` of all classes, bilinear resizing of every class to the strided and the
  output-stride grid, the image's classes selected last, divided by their max;
* **workflow**: ``wsss.cam_infer.infer_cams`` (the ``cam_shard`` rule's code path, HDF5 writing
  included) with ``--precision`` and ``--channels-last`` (the default of ``cam.channels_last``), on the DataLoader with the workers the
  thread policy gives a job of ``--threads`` cores (``wsss.workflow.threads.torch_job``).

It prints images/s of each on the device present (CUDA if available), the ratio, and the largest
difference between their ``high_res`` maps. Network: the workflow's default backbone (ResNet-18)
or ``--backbone``; random weights (the cost does not depend on them).

    python bench/cam_throughput.py --channels-last                 # 8 images, fp32, the defaults
    python bench/cam_throughput.py                                 # contiguous NCHW (slower on CPU)
    python bench/cam_throughput.py --images 50 --precision bf16 --channels-last   # on a GPU

IRN's loop runs its CPU forward in channels_last without asking: its views are transposed numpy
arrays (``HWC2CHW`` without a copy), so torch sees NHWC strides; CPU max-pooling and convolutions
are several times faster in that layout. That was the 1.2-1.4x per-image gap of the workflow.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCALES = (1.0, 0.5, 1.5, 2.0)


class ArrayDataset:
    """The images as a minimal wsss dataset (what ``infer_cams`` reads)."""

    def __init__(self, images, num_classes):
        self.images = images
        self.num_fg_classes = num_classes

    def load_image(self, image_id):
        return self.images[image_id]


def reference(method, images, labels, device):
    """IRN ``make_cam`` per image: returns ``{id: high_res}`` and the seconds it took."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for image_id, img in images.items():
            h, w = img.shape[:2]
            packs = []
            for s in SCALES:
                im = (
                    img
                    if s == 1.0
                    else np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BICUBIC))
                )
                x = ((np.asarray(im, np.float32) / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1)
                packs.append(torch.from_numpy(np.stack([x, np.flip(x, -1)])))
            outputs = []
            for p in packs:
                c = method.cam(p.to(device))
                outputs.append(c[0] + c[1].flip(-1))
            os_ = method.output_stride
            up = (math.ceil(h / os_) * os_, math.ceil(w / os_) * os_)
            high = torch.sum(
                torch.stack([F.interpolate(o[:, None], up, mode="bilinear", align_corners=False) for o in outputs]), 0
            )[:, 0, :h, :w]
            strided = (math.ceil(h / 4), math.ceil(w / 4))
            low = sum(F.interpolate(o[None], strided, mode="bilinear", align_corners=False)[0] for o in outputs)
            keys = torch.as_tensor(np.nonzero(labels[image_id])[0], device=device)
            high = high[keys]
            high = high / (F.adaptive_max_pool2d(high, (1, 1)) + 1e-5)
            low = low[keys]
            low = low / (F.adaptive_max_pool2d(low, (1, 1)) + 1e-5)
            out[image_id] = high.cpu().numpy()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def workflow(method, images, labels, device, workers, precision, channels_last):
    """``wsss.cam_infer.infer_cams`` into a temporary shard: ``{id: high_res}`` and its seconds."""
    from wsss.cam_infer import infer_cams
    from wsss.cams import CamStore

    ids = list(images)
    ds = ArrayDataset(images, method.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-1-of-1.h5"
        t0 = time.perf_counter()
        infer_cams(
            method,
            ds,
            ids,
            labels,
            path,
            scales=SCALES,
            flip=True,
            normalisation="max",
            upsample="relu_then_raw",
            precision=precision,
            channels_last=channels_last,
            resolved_config={"bench": "cam_throughput"},
            device=device,
            num_workers=workers,
            progress=False,
        )
        seconds = time.perf_counter() - t0
        store = CamStore([path])
        out = {i: store.get(i).high_res for i in ids}
    return out, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2, help="cores of the job (thread policy)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    from wsss.methods import build_method
    from wsss.models import build_backbone
    from wsss.workflow.jobs import device_and_workers

    device, workers = device_and_workers(a.threads)
    torch.manual_seed(0)
    backbone = build_backbone(a.backbone, pretrained="none")
    method = build_method("cam", num_classes=a.classes, backbone=backbone).to(device).eval()
    rng = np.random.default_rng(0)
    images = {f"img{i:04d}": (rng.random((375, 500, 3)) * 255).astype(np.uint8) for i in range(a.images)}
    labels = {}
    for i in images:
        y = np.zeros(a.classes, np.float32)
        y[rng.choice(a.classes, size=2, replace=False)] = 1
        labels[i] = y
    # warm-up (allocator, cuDNN autotuning) on one image, outside the timing
    first = dict(list(images.items())[:1])
    reference(method, first, labels, device)
    ref, t_ref = reference(method, images, labels, device)
    workflow(method, first, labels, device, 0, a.precision, a.channels_last)
    new, t_new = workflow(method, images, labels, device, workers, a.precision, a.channels_last)
    diff = max(float(np.abs(ref[i] - new[i]).max()) for i in images)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {a.images} images 500x375, {a.backbone}, scales {SCALES} + flips")
    label = f"workflow ({a.precision}{', channels_last' if a.channels_last else ''}, {workers} workers)"
    print(f"{'':<46} {'images/s':>9} {'s/image':>8}")
    print(f"{'reference (IRN make_cam loop)':<46} {a.images / t_ref:>9.3f} {t_ref / a.images:>8.3f}")
    print(f"{label:<46} {a.images / t_new:>9.3f} {t_new / a.images:>8.3f}")
    print(f"speed ratio workflow / reference: {t_ref / t_new:.2f}x; max |high_res difference|: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
