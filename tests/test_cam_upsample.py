"""``cam.upsample``: where the ReLU sits relative to the resizing in CAM inference (wsss.cam_infer).

``relu_then_raw`` (IRN ``make_cam``) resizes the ReLU'd CAM on the output-stride grid and crops;
``raw_then_relu`` (the AEFT/KTSE/ACR ``infer_multi``) resizes the raw CAM to the image size and
applies the ReLU after. Both are checked against a direct torch computation on a hand-made raw CAM.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.cam_infer import UPSAMPLES, fused_cams, resolve_upsample
from wsss.methods.acr import ACRMethod
from wsss.methods.aeft import AEFTMethod
from wsss.methods.base import Method
from wsss.methods.cam import CAMMethod
from wsss.methods.gpp import GPPMethod
from wsss.methods.islfsl import build_islfsl
from wsss.methods.ktse import KTSEMethod
from wsss.models import build_backbone

CLASSES = {"cam": CAMMethod, "gpp": GPPMethod, "aeft": AEFTMethod, "ktse": KTSEMethod, "acr": ACRMethod}


class FixedCAM(Method):
    """A method whose raw CAM of a view is fixed in advance (one tensor per view, ``2 x C x h x w``
    for a flip pair), whatever the image."""

    name = "fixed"

    def __init__(self, raws, output_stride: int = 4):
        super().__init__()
        self.raws = list(raws)
        self.calls = 0
        self._os = output_stride

    @property
    def output_stride(self) -> int:
        return self._os

    def raw_cam(self, images: torch.Tensor) -> torch.Tensor:
        raw = self.raws[self.calls % len(self.raws)]
        self.calls += 1
        assert raw.shape[0] == images.shape[0]
        return raw

    def cam(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.raw_cam(images))


def _views(n: int, batch: int):
    return [torch.zeros(batch, 3, 8, 8) for _ in range(n)]


def _max_norm(m: torch.Tensor) -> torch.Tensor:
    return m / (m.flatten(1).max(1).values[:, None, None] + 1e-5)


def test_hand_computed_one_row():
    """Raw CAM [-1, 1] on a 1 x 2 grid, image 1 x 4, stride 4: bilinear (align_corners=False)
    samples the source at x = -0.25, 0.25, 0.75, 1.25 (clamped to [0, 1])."""
    raw = torch.tensor([[[[-1.0, 1.0]]]])  # 1 view x 1 class x 1 x 2
    keys = np.array([0])
    for upsample, expected in [("raw_then_relu", [0.0, 0.0, 0.5, 1.0]), ("relu_then_raw", [0.0, 0.25, 0.75, 1.0])]:
        _, high = fused_cams(FixedCAM([raw]), _views(1, 1), (1, 4), keys, "max", torch.device("cpu"), upsample)
        np.testing.assert_allclose(high[0, 0], np.array(expected) / (1 + 1e-5), rtol=0, atol=1e-7)


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("normalisation", ["max", "minmax"])
def test_both_orders_match_a_direct_computation(flip, normalisation):
    """Two scales (feature maps 3 x 5 and 6 x 9) of a 21 x 35 image, classes 1 and 3 of 4."""
    gen = torch.Generator().manual_seed(0)
    batch = 2 if flip else 1
    raws = [torch.randn(batch, 4, 3, 5, generator=gen), torch.randn(batch, 4, 6, 9, generator=gen)]
    keys = np.array([1, 3])
    size = (21, 35)
    low_size = (math.ceil(21 / 4), math.ceil(35 / 4))
    os_ = 8
    grid = (math.ceil(21 / os_) * os_, math.ceil(35 / os_) * os_)

    def norm(m):
        from wsss.cam_infer import normalise_maps

        return normalise_maps(m, normalisation).numpy()

    def fuse(maps):
        return maps[0] + maps[1].flip(-1) if flip else maps[0]

    # raw_then_relu: every view's raw CAM straight to the map size, ReLU, flip undone, summed
    ref_low, ref_high = torch.zeros(2, *low_size), torch.zeros(2, *size)
    for r in raws:
        r = r[:, torch.as_tensor(keys)]
        ref_low += fuse(F.relu(F.interpolate(r, low_size, mode="bilinear", align_corners=False)))
        ref_high += fuse(F.relu(F.interpolate(r, size, mode="bilinear", align_corners=False)))
    low, high = fused_cams(
        FixedCAM(raws, os_), _views(2, batch), size, keys, normalisation, torch.device("cpu"), "raw_then_relu"
    )
    np.testing.assert_allclose(low, norm(ref_low), atol=1e-6)
    np.testing.assert_allclose(high, norm(ref_high), atol=1e-6)

    # relu_then_raw: the ReLU'd CAM (flip pair fused) resized on the stride grid, then cropped
    ref_low, ref_grid = torch.zeros(2, *low_size), torch.zeros(2, *grid)
    for r in raws:
        o = fuse(F.relu(r))[torch.as_tensor(keys)][None]
        ref_low += F.interpolate(o, low_size, mode="bilinear", align_corners=False)[0]
        ref_grid += F.interpolate(o, grid, mode="bilinear", align_corners=False)[0]
    low2, high2 = fused_cams(
        FixedCAM(raws, os_), _views(2, batch), size, keys, normalisation, torch.device("cpu"), "relu_then_raw"
    )
    np.testing.assert_allclose(low2, norm(ref_low), atol=1e-6)
    np.testing.assert_allclose(high2, norm(ref_grid[:, :21, :35]), atol=1e-6)

    # the two orders differ on a CAM with negative values
    assert np.abs(high - high2).max() > 1e-2


def test_default_keeps_the_strided_path():
    """fused_cams without ``upsample`` (and ``auto`` for a method without its own default) is IRN's path."""
    raws = [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))]
    keys = np.array([0, 2])
    a = fused_cams(FixedCAM(raws), _views(1, 2), (13, 15), keys, "max", torch.device("cpu"))
    b = fused_cams(FixedCAM(raws), _views(1, 2), (13, 15), keys, "max", torch.device("cpu"), "auto")
    c = fused_cams(FixedCAM(raws), _views(1, 2), (13, 15), keys, "max", torch.device("cpu"), "relu_then_raw")
    for x, y, z in zip(a, b, c):
        assert np.array_equal(x, y) and np.array_equal(x, z)


def _method(name: str) -> Method:
    torch.manual_seed(0)
    bb = build_backbone("resnet18", pretrained="none", freeze_bn=False, trainable_from=None)
    if name.endswith("+islfsl"):
        return build_islfsl(name[: -len("+islfsl")], num_classes=4, backbone=bb).eval()
    return CLASSES[name](num_classes=4, backbone=bb).eval()


@pytest.mark.parametrize(
    "name, default",
    [
        ("cam", "relu_then_raw"),
        ("gpp", "raw_then_relu"),
        ("cam+islfsl", "relu_then_raw"),
        ("aeft", "raw_then_relu"),
        ("ktse", "raw_then_relu"),
        ("acr", "raw_then_relu"),
    ],
)
def test_auto_is_the_method_default_and_raw_cam_is_cam_before_relu(name, default):
    method = _method(name)
    assert resolve_upsample(method, "auto") == default
    for explicit in UPSAMPLES:
        assert resolve_upsample(method, explicit) == explicit
    x = torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(F.relu(method.raw_cam(x)), method.cam(x))


def test_islfsl_follows_its_base():
    method = _method("cam+islfsl")
    method.base.cam_upsample = "raw_then_relu"
    assert resolve_upsample(method, "auto") == "raw_then_relu"


def test_unknown_order_and_missing_raw_cam():
    with pytest.raises(ValueError, match="valid: relu_then_raw, raw_then_relu, auto"):
        resolve_upsample(_method("cam"), "bicubic")

    class NoRaw(Method):
        name = "noraw"

        def cam(self, images):
            return torch.zeros(images.shape[0], 1, 2, 2)

    with pytest.raises(NotImplementedError, match="relu_then_raw"):
        fused_cams(NoRaw(), _views(1, 2), (8, 8), np.array([0]), "max", torch.device("cpu"), "raw_then_relu")
