"""Multi-scale CAM inference: flip-pair batching, fusion, normalisation, shards, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.cam_infer import fused_cams, infer_cams, normalise_maps, shard_ids
from wsss.cams import CamStore
from wsss.data.transforms import multiscale_views
from wsss.methods import build_method
from wsss.models import build_backbone
from wsss.seeds import cam_to_label, sweep_table, sweep_thresholds


def small_method(seed=0):
    torch.manual_seed(seed)
    bb = build_backbone("resnet18", pretrained="none", freeze_bn=False, trainable_from=None)
    return build_method("cam", num_classes=8, backbone=bb).eval()


def test_normalisations():
    m = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[1.0, 1.0], [3.0, 5.0]]])
    mx = normalise_maps(m, "max")
    torch.testing.assert_close(mx[0], m[0] / (4 + 1e-5))
    mm = normalise_maps(m, "minmax")
    torch.testing.assert_close(mm[1], F.relu(m[1] - 1 - 1e-5) / (4 + 1e-5))
    assert float(mm.min()) == 0.0 and float(mx.max()) < 1.0
    with pytest.raises(ValueError, match="valid: max, minmax"):
        normalise_maps(m, "softmax")


def test_flip_pair_batch_equals_separate_passes():
    """The batched [image, flipped] pair gives the same fused maps as two separate forwards."""
    method = small_method()
    img = (np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)
    scales, keys = [1.0, 0.5], np.array([1, 4])
    views = multiscale_views(img, scales, flip=True)
    low, high = fused_cams(
        method, [torch.from_numpy(v) for v in views], img.shape[:2], keys, "max", torch.device("cpu")
    )
    assert low.shape == (2, 10, 14) and high.shape == (2, 37, 53)

    # reference: image and flip run one at a time, fused by hand
    os_ = method.output_stride
    up = (int(np.ceil(37 / os_)) * os_, int(np.ceil(53 / os_)) * os_)
    ref_low, ref_high = torch.zeros(2, 10, 14), torch.zeros(2, *up)
    with torch.no_grad():
        for v in views:
            v = torch.from_numpy(v)
            a = method.cam(v[:1])[0]
            b = method.cam(v[1:])[0].flip(-1)
            o = (a + b)[torch.as_tensor(keys)][None]
            ref_low += F.interpolate(o, (10, 14), mode="bilinear", align_corners=False)[0]
            ref_high += F.interpolate(o, up, mode="bilinear", align_corners=False)[0]
    ref_low = ref_low / (ref_low.flatten(1).max(1).values[:, None, None] + 1e-5)
    ref_high = ref_high[:, :37, :53]
    ref_high = ref_high / (ref_high.flatten(1).max(1).values[:, None, None] + 1e-5)
    np.testing.assert_allclose(low, ref_low.numpy(), atol=1e-5)
    np.testing.assert_allclose(high, ref_high.numpy(), atol=1e-5)


def test_shard_ids_partition():
    ids = [str(i) for i in range(11)]
    parts = [shard_ids(ids, i, 3) for i in range(3)]
    assert sum(parts, []) == ids and max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shard_ids(ids, 3, 3)


def test_cam_to_label():
    hr = np.zeros((2, 2, 3), np.float32)
    hr[0, 0, 0] = 0.9
    hr[1, 1, 2] = 0.5
    hr[1, 0, 1] = 0.1
    lab = cam_to_label(hr, np.array([2, 6]), 0.2)
    np.testing.assert_array_equal(lab, [[3, 0, 0], [0, 0, 7]])
    assert cam_to_label(np.zeros((0, 2, 2), np.float32), np.array([], int), 0.2).sum() == 0


def test_infer_shards_and_sweep(tiny_cfg, tmp_path):
    """Two shards cover every id once; the reader finds them; the sweep marks one chosen threshold."""
    from wsss.data import open_dataset

    ds = open_dataset(tiny_cfg)
    ids = ds.ids("val")
    labels = {i: ds.labels(i) for i in ids}
    method = small_method()
    paths = []
    for k in range(2):
        paths.append(
            infer_cams(
                method,
                ds,
                shard_ids(ids, k, 2),
                labels,
                tmp_path / f"s{k}.h5",
                scales=[1.0, 0.5],
                flip=True,
                normalisation="max",
                resolved_config={"x": 1},
                shard_index=k,
                num_shards=2,
                progress=False,
            )
        )
    with CamStore(paths) as store:
        assert sorted(store.ids()) == sorted(ids)
        rec = store[ids[0]]
        assert list(rec.keys) == list(np.nonzero(labels[ids[0]])[0])
        assert rec.high_res.shape[1:] == ds.load_mask(ids[0]).shape
        assert 0.99 < rec.high_res.max() <= 1.0
        cms = sweep_thresholds(store, ds, ids, [0.1, 0.5], progress=False)
    df = sweep_table(cms, ds.class_names, "val")
    assert df["chosen_with_gt"].sum() == 1
    assert df.loc[df["chosen_with_gt"], "miou"].iloc[0] == df["miou"].max()


@pytest.mark.parametrize("upsample", ["relu_then_raw", "raw_then_relu"])
def test_autocast_and_channels_last_stay_close_to_fp32(upsample):
    """cam.precision bf16 (the autocast available on the CPU) and cam.channels_last change the fused,
    normalised maps by at most float rounding: < 0.02 of the per-class maximum for bf16 (bf16
    keeps 8 bits of mantissa; measured 0.007), < 1e-4 for channels_last."""
    torch.manual_seed(0)
    m = build_method("cam", num_classes=3, backbone=build_backbone("resnet18", pretrained="none")).eval()
    img = (np.random.default_rng(0).random((61, 83, 3)) * 255).astype(np.uint8)
    views = [torch.from_numpy(v) for v in multiscale_views(img, (1.0, 0.5, 1.5), True)]
    keys = np.array([0, 2])
    cpu = torch.device("cpu")
    ref = fused_cams(m, views, (61, 83), keys, "max", cpu, upsample)
    bf16 = fused_cams(m, views, (61, 83), keys, "max", cpu, upsample, precision="bf16")
    m.to(memory_format=torch.channels_last)
    cl = fused_cams(m, views, (61, 83), keys, "max", cpu, upsample, channels_last=True)
    for r, b, c in zip(ref, bf16, cl):
        assert r.dtype == b.dtype == c.dtype == np.float32
        assert np.abs(r - b).max() < 0.02
        assert np.abs(r - b).max() > 0  # bf16 really ran
        np.testing.assert_allclose(c, r, atol=1e-4)


def test_unknown_precision_fails_loudly():
    with pytest.raises(ValueError, match="cam.precision 'fp8'.*fp32, bf16, fp16"):
        fused_cams(None, [], (4, 4), np.array([0]), "max", torch.device("cpu"), precision="fp8")
