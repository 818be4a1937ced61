"""Dense-CRF post-processing (wsss.refine.crf): the three flavours, the stage and mask evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsss.cams import CamShardWriter, CamStore
from wsss.config import section_defaults
from wsss.data.voc import VOCDataset
from wsss.io import DataError, read_label_png, voc_palette, write_label_png
from wsss.metrics import ConfusionMatrix
from wsss.refine import crf as crfmod
from wsss.refine.crf import (
    alpha_for_threshold,
    crf_inference_label,
    crf_masks_shard,
    crf_params_for_seeds,
    crf_seed_threshold,
    crf_settings,
    crf_with_alpha,
    deeplab_crf,
    evaluate_masks,
)
from wsss.seeds import cam_to_label

H, W, EDGE = 40, 60, 30  # two flat colour regions; the true foreground is columns >= EDGE


@pytest.fixture(scope="module")
def scene():
    """Image with a vertical colour edge and a noisy CAM whose 0.5 crossing lies 7 px left of it."""
    rng = np.random.default_rng(0)
    img = np.zeros((H, W, 3), np.int64)
    img[:, :EDGE] = (200, 60, 40)
    img[:, EDGE:] = (40, 90, 210)
    img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    x = np.arange(W)
    ramp = 1.0 / (1.0 + np.exp(-(x - (EDGE - 7)) / 2.5))
    cam = np.clip(ramp[None, :] + rng.normal(0, 0.08, (H, W)), 0, 1)[None].astype(np.float32)
    true = np.zeros((H, W), bool)
    true[:, EDGE:] = True
    return img, cam, true


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


# ------------------------------------------------------------------ CRF with alpha


@pytest.mark.parametrize("alpha", [1, 2, 4])
def test_crf_with_alpha_moves_boundary_to_colour_edge(scene, alpha):
    img, cam, true = scene
    probs, labels = crf_with_alpha(img, cam, [4], alpha)
    raw = cam[0] > (1 - cam[0]) ** alpha  # the un-refined argmax of [bg, cam]
    assert iou(raw, true) < 0.85
    assert iou(labels == 5, true) > iou(raw, true) + 0.1
    assert iou(labels == 5, true) > 0.95
    assert probs.shape == (2, H, W) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 5}
    np.testing.assert_array_equal(labels, np.array([0, 5], np.uint8)[probs.argmax(0)])


def test_crf_with_alpha_maps_keys_and_larger_alpha_gives_more_foreground(scene):
    img, cam, _ = scene
    two = np.concatenate([cam, cam[:, ::-1, :] * 0.3]).astype(np.float32)  # a weak second class
    probs, labels = crf_with_alpha(img, two, np.array([2, 11]), 2)
    assert probs.shape == (3, H, W)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert set(np.unique(labels)) <= {0, 3, 12}
    fg = [(crf_with_alpha(img, cam, [0], a)[1] > 0).sum() for a in (1, 16)]
    assert fg[1] > fg[0]


def test_crf_with_alpha_no_classes_is_background_without_crf(scene, monkeypatch):
    img, _, _ = scene
    monkeypatch.setattr(crfmod, "_dense_crf", lambda *a, **k: pytest.fail("CRF must not run for K = 0"))
    probs, labels = crf_with_alpha(img, np.zeros((0, H, W), np.float32), np.zeros(0, np.int64), 9)
    assert probs.shape == (1, H, W) and np.all(probs == 1)
    assert labels.shape == (H, W) and labels.dtype == np.uint8 and not labels.any()


def test_crf_with_alpha_input_checks(scene):
    img, cam, _ = scene
    with pytest.raises(ValueError, match=r"\(40, 59\).*\(40, 60\)"):
        crf_with_alpha(img[:, :59], cam, [0], 2)
    with pytest.raises(ValueError, match="uint8"):
        crf_with_alpha(img.astype(np.float32) - 120.0, cam, [0], 2)
    with pytest.raises(ValueError, match="keys"):
        crf_with_alpha(img, cam, [0, 1], 2)
    with pytest.raises(ValueError, match="alpha"):
        crf_with_alpha(img, cam, [0], -1)
    with pytest.raises(ValueError, match="iterations"):
        crf_with_alpha(img, cam, [0], 2, t=-1)


def test_non_contiguous_and_int_images_are_accepted(scene):
    img, cam, _ = scene
    ref = crf_with_alpha(img, cam, [0], 2)[1]
    flipped_twice = np.ascontiguousarray(img[:, ::-1])[:, ::-1]  # a non-contiguous view of the same pixels
    assert not flipped_twice.flags.c_contiguous
    np.testing.assert_array_equal(crf_with_alpha(flipped_twice, cam, [0], 2)[1], ref)
    np.testing.assert_array_equal(crf_with_alpha(img.astype(np.int32), cam.astype(np.float64), [0], 2)[1], ref)
    read_only = img.copy()
    read_only.flags.writeable = False  # as returned by np.asarray(PIL image)
    np.testing.assert_array_equal(crf_with_alpha(read_only, cam, [0], 2)[1], ref)
    np.testing.assert_array_equal(
        crf_inference_label(read_only, (cam[0] > 0.5).astype(np.uint8), 2),
        crf_inference_label(img, (cam[0] > 0.5).astype(np.uint8), 2),
    )


# ------------------------------------------------------------------ IRN label CRF


def test_label_crf_moves_boundary_to_colour_edge(scene):
    img, cam, true = scene
    seed = (cam[0] > 0.5).astype(np.int64)
    out = crf_inference_label(img, seed, 2)
    assert out.shape == (H, W) and out.dtype == np.uint8
    assert iou(out == 1, true) > iou(seed == 1, true) + 0.1
    assert iou(out == 1, true) > 0.95


def test_label_crf_single_label_and_checks(scene, monkeypatch):
    img, _, _ = scene
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        crf_inference_label(img, np.full((H, W), 2), 2)
    with pytest.raises(ValueError, match=r"image size \(40, 60\).*\(30, 60\)"):
        crf_inference_label(img, np.zeros((30, W), np.int64), 2)
    with pytest.raises(ValueError, match="gt_prob"):
        crf_inference_label(img, np.zeros((H, W), np.int64), 2, gt_prob=1.0)
    monkeypatch.setattr(crfmod, "_dense_crf", lambda *a, **k: pytest.fail("CRF must not run for one label"))
    out = crf_inference_label(img, np.zeros((H, W), np.int64), 1)
    assert out.shape == (H, W) and not out.any()


def test_seed_threshold_crf(scene):
    img, cam, true = scene
    seed = cam_to_label(cam, np.array([6]), 0.5)
    out = crf_seed_threshold(img, cam, [6], 0.5)
    assert set(np.unique(out)) <= {0, 7}
    assert iou(out == 7, true) > iou(seed == 7, true) + 0.1
    assert iou(out == 7, true) > 0.95
    # zero iterations leave the seed unchanged: the seed is cam_to_label's
    np.testing.assert_array_equal(crf_seed_threshold(img, cam, [6], 0.5, t=0), seed)
    assert not crf_seed_threshold(img, np.zeros((0, H, W), np.float32), [], 0.5).any()


# ------------------------------------------------------------------ DeepLab CRF


def test_deeplab_crf_moves_boundary_and_normalises(scene):
    img, cam, true = scene
    probs = np.concatenate([1 - cam, cam]).astype(np.float32)
    out = deeplab_crf(img, probs)
    assert out.shape == (2, H, W) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    assert iou(out.argmax(0) == 1, true) > iou(probs.argmax(0) == 1, true) + 0.1


def test_deeplab_crf_single_class_and_checks(scene):
    img, cam, _ = scene
    out = deeplab_crf(img, cam)
    assert out.shape == (1, H, W) and np.all(out == 1)
    with pytest.raises(ValueError, match=r"image size \(40, 60\).*\(20, 30\)"):
        deeplab_crf(img, np.full((3, 20, 30), 1 / 3, np.float32))
    with pytest.raises(ValueError, match="shape"):
        deeplab_crf(img, np.ones((H, W), np.float32))


# ------------------------------------------------------------------ config section


def test_crf_settings_defaults_and_errors():
    p = crf_settings({})
    assert p["mode"] == "alpha" and p["alpha"] == 9.0 and p["iterations"] == 10
    assert (p["bi_sxy"], p["bi_srgb"], p["bi_compat"]) == (80, 13, 10)  # PSA
    q = crf_settings({"mode": "threshold", "shards": 4})
    assert (q["bi_sxy"], q["bi_srgb"], q["bi_compat"]) == (50, 5, 10)  # IRN
    assert "shards" not in q
    assert crf_settings({"mode": "threshold", "bi_sxy": 60})["bi_sxy"] == 60
    # the defaults are the schema's (no table of their own)
    d = section_defaults("crf")
    assert {k: p[k] for k in ("mode", "alpha", "bg_threshold", "iterations", "gt_prob")} == {
        k: d[k] for k in ("mode", "alpha", "bg_threshold", "iterations", "gt_prob")
    }
    with pytest.raises(ValueError, match="alpah"):
        crf_settings({"alpah": 9})
    with pytest.raises(ValueError, match="crf.mode"):
        crf_settings({"mode": "magic"})
    with pytest.raises(ValueError, match="crf.iterations"):
        crf_settings({"iterations": 2.5})
    with pytest.raises(ValueError, match="crf.bi_sxy"):
        crf_settings({"bi_sxy": 0})


def test_alpha_for_threshold_puts_the_crossing_at_the_seed_threshold():
    for t in (0.05, 0.2, 0.3, 0.55, 0.9):
        a = alpha_for_threshold(t)
        assert (1 - t) ** a == pytest.approx(t, rel=1e-12)
        # above t the CAM wins over the background score, below it loses (as the seeds at t)
        assert (1 - (t + 0.01)) ** a < t + 0.01 and (1 - (t - 0.01)) ** a > t - 0.01
    assert alpha_for_threshold(0.2) == pytest.approx(7.2126, abs=1e-4)
    assert alpha_for_threshold(0.55) == pytest.approx(0.7487, abs=1e-4)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="seed threshold in \\(0, 1\\)"):
            alpha_for_threshold(bad)


def test_crf_from_seeds_is_resolved_or_refused():
    p = crf_params_for_seeds({"mode": "alpha", "alpha": 9, "from_seeds": True}, 0.3)
    assert p["alpha"] == pytest.approx(math.log(0.3) / math.log(0.7)) and p["from_seeds"] is False
    assert crf_settings(p)["alpha"] == pytest.approx(p["alpha"])
    q = crf_params_for_seeds({"mode": "threshold", "from_seeds": True}, 0.35)
    assert q["bg_threshold"] == 0.35 and crf_settings(q)["bg_threshold"] == 0.35
    assert crf_params_for_seeds({"alpha": 4}, 0.3) == {"alpha": 4}  # no from_seeds: unchanged
    with pytest.raises(ValueError, match="no seed threshold"):
        crf_params_for_seeds({"from_seeds": True}, None)
    # unresolved, the stage would silently use the fixed alpha: refused
    with pytest.raises(ValueError, match="crf.from_seeds is set"):
        crf_settings({"from_seeds": True})


# ------------------------------------------------------------------ stage + evaluation


@pytest.fixture(scope="module")
def cam_setup(tiny_root, tmp_path_factory):
    """The tiny synthetic dataset and a CAM store made from its GT masks (blurred, noisy)."""
    ds = VOCDataset(tiny_root)
    ids = ds.ids("train")[:5]
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("crfcams") / "cams.h5"
    with CamShardWriter(path, config={"test": "crf"}, scales=[1.0], normalisation="max") as w:
        for image_id in ids:
            gt = ds.load_mask(image_id)
            keys = np.flatnonzero(ds.labels(image_id)).astype(np.int64)
            h, wd = gt.shape
            high = (
                np.stack([(gt == k + 1).astype(np.float32) for k in keys])
                if len(keys)
                else np.zeros((0, h, wd), np.float32)
            )
            high = np.clip(0.7 * high + rng.uniform(0, 0.3, high.shape), 0, 1).astype(np.float32)
            low = high[:, ::4, ::4]
            assert low.shape[1:] == (math.ceil(h / 4), math.ceil(wd / 4))
            w.add(image_id, keys, low, high)
    return ds, ids, path


def test_crf_masks_shard_writes_resumes_and_evaluates(cam_setup, tmp_path, monkeypatch):
    ds, ids, path = cam_setup
    out = tmp_path / "masks"
    calls = []
    real = crfmod.crf_with_alpha

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(crfmod, "crf_with_alpha", counting)
    # a PNG an interrupted attempt of the same job wrote (in its journal) is kept, not recomputed;
    # one left by an earlier completed run (ids[1]: not in the journal) is rewritten
    from wsss.workflow.journal import ShardJournal

    sentinel = np.full(ds.load_mask(ids[0]).shape, 3, np.uint8)
    write_label_png(out / f"{ids[0]}.png", sentinel, voc_palette())
    write_label_png(out / f"{ids[1]}.png", sentinel, voc_palette())
    interrupted = ShardJournal(tmp_path / "shard.journal", {"job": 1})
    interrupted.start()
    interrupted.record(ids[0])
    interrupted.close()
    journal = ShardJournal(tmp_path / "shard.journal", {"job": 1})
    with CamStore(path) as store:
        res = crf_masks_shard(ds, store, ids, out, {"alpha": 4}, progress=False, journal=journal)
    journal.finish()
    assert res == {"written": len(ids) - 1, "skipped": 1}
    assert len(calls) == len(ids) - 1
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.png" for i in ids)  # no temporary files left
    np.testing.assert_array_equal(read_label_png(out / f"{ids[0]}.png"), sentinel)
    from PIL import Image

    with Image.open(out / f"{ids[1]}.png") as im:
        assert im.mode == "P"
    # masks are the CRF's labels
    with CamStore(path) as store:
        rec = store[ids[1]]
        expect = real(ds.load_image(ids[1]), rec.high_res, rec.keys, 4)[1]
    np.testing.assert_array_equal(read_label_png(out / f"{ids[1]}.png"), expect)
    # a second run of the finished job (forced rerun) recomputes everything
    with CamStore(path) as store:
        assert crf_masks_shard(
            ds,
            store,
            ids,
            out,
            {"alpha": 4},
            progress=False,
            journal=ShardJournal(tmp_path / "shard.journal", {"job": 1}),
        ) == {"written": len(ids), "skipped": 0}
    assert len(calls) == 2 * len(ids) - 1

    cm = evaluate_masks(ds, ids, out)
    direct = ConfusionMatrix(ds.num_classes)
    for i in ids:
        direct.update(ds.load_mask(i), read_label_png(out / f"{i}.png"))
    np.testing.assert_array_equal(cm.mat, direct.mat)
    assert cm.num_images == len(ids) and cm.mat.sum() > 0
    # the CRF masks are better than the sentinel image: the mask of ids[1] matches its GT well
    one = ConfusionMatrix(ds.num_classes).update(ds.load_mask(ids[1]), expect)
    assert np.trace(one.mat) / one.mat.sum() > 0.9


def test_crf_masks_shard_threshold_mode_and_workers(cam_setup, tmp_path):
    ds, ids, path = cam_setup
    with CamStore(path) as store:
        crf_masks_shard(ds, store, ids[:3], tmp_path / "a", {"mode": "threshold", "bg_threshold": 0.5}, progress=False)
        crf_masks_shard(
            ds, store, ids[:3], tmp_path / "b", {"mode": "threshold", "bg_threshold": 0.5}, progress=False, workers=2
        )
        rec = store[ids[0]]
    for i in ids[:3]:
        np.testing.assert_array_equal(
            read_label_png(tmp_path / "a" / f"{i}.png"), read_label_png(tmp_path / "b" / f"{i}.png")
        )
    expect = crf_seed_threshold(ds.load_image(ids[0]), rec.high_res, rec.keys, 0.5)
    np.testing.assert_array_equal(read_label_png(tmp_path / "a" / f"{ids[0]}.png"), expect)


def test_crf_masks_shard_errors(cam_setup, tmp_path):
    ds, ids, path = cam_setup
    with CamStore(path) as store:
        with pytest.raises(KeyError, match="no CAM"):
            crf_masks_shard(ds, store, ids + ["not_an_id"], tmp_path, {}, progress=False)
        with pytest.raises(ValueError, match="unknown config key.*'alhpa'.*under 'crf'"):
            crf_masks_shard(ds, store, ids, tmp_path, {"alhpa": 3}, progress=False)


def test_evaluate_masks_missing_png_names_file(cam_setup, tmp_path):
    ds, ids, _ = cam_setup
    write_label_png(tmp_path / f"{ids[0]}.png", ds.load_mask(ids[0]))
    with pytest.raises(DataError, match=rf"{ids[1]}\.png"):
        evaluate_masks(ds, ids[:2], tmp_path)
    write_label_png(tmp_path / f"{ids[1]}.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(DataError, match="size"):
        evaluate_masks(ds, ids[:2], tmp_path)
