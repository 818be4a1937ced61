"""Tests for wsss.metrics: hand-computed cases, an independent per-class loop, DAVIS boundaries."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from wsss.metrics import (
    BoundaryAccumulator,
    ConfusionMatrix,
    boundary_counts,
    boundary_f_score,
    boundary_map,
    boundary_prf,
    boundary_tolerance,
    dilate_disk,
    disk,
    evaluate_pairs,
    write_metrics_csv,
)

NAN = float("nan")


def _eq(a, b):
    """Element-wise equality that treats NaN == NaN."""
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# confusion matrix: hand-computed cases
# ------------------------------------------------------------------------------------------

# 3 classes; the pixel at (1, 2) is void. Non-ignored (gt, pred) pairs:
# (0,0) (0,1) (1,1) (1,2) (2,2)
GT = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1], [2, 2, 0]], dtype=np.uint8)


def test_confusion_entries_and_metrics_by_hand():
    cm = ConfusionMatrix(3).update(GT, PRED)
    np.testing.assert_array_equal(cm.mat, [[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert cm.mat.dtype == np.int64
    assert cm.ignored == 1 and cm.num_images == 1 and cm.total_pixels == 5
    np.testing.assert_array_equal(cm.unlabelled, [0, 0, 0])
    # rows (gt) = [2, 2, 1], cols (pred) = [1, 2, 2], tp = [1, 1, 1]
    _eq(cm.iou(), [1 / 2, 1 / 3, 1 / 2])
    assert cm.miou == pytest.approx(4 / 9, abs=1e-15)
    _eq(cm.precision(), [1, 1 / 2, 1 / 2])
    _eq(cm.recall(), [1 / 2, 1 / 2, 1])
    assert cm.mean_precision == pytest.approx(2 / 3)
    assert cm.mean_recall == pytest.approx(2 / 3)
    assert cm.pixel_accuracy == pytest.approx(3 / 5)
    assert cm.coverage == 1.0
    assert cm.confident_pixel_accuracy == pytest.approx(3 / 5)


def test_miou_with_a_nan_class():
    # class 3 occurs in neither gt nor pred -> NaN, left out of the mean
    cm = ConfusionMatrix(4).update(GT, PRED)
    iou = cm.iou()
    assert math.isnan(iou[3])
    _eq(iou[:3], [1 / 2, 1 / 3, 1 / 2])
    assert cm.miou == pytest.approx(4 / 9)
    p, r = cm.precision(), cm.recall()
    assert math.isnan(p[3]) and math.isnan(r[3])
    assert cm.mean_precision == pytest.approx(2 / 3)
    # predicted but never in gt: IoU 0, precision 0, recall NaN
    cm2 = ConfusionMatrix(3).update(np.array([[0, 0]]), np.array([[0, 2]]))
    _eq(cm2.iou(), [1 / 2, NAN, 0])
    _eq(cm2.precision(), [1, NAN, 0])
    _eq(cm2.recall(), [1 / 2, NAN, NAN])
    assert cm2.miou == pytest.approx(1 / 4)


def test_empty_matrix_gives_nan_without_warnings():
    cm = ConfusionMatrix(3)
    with np.errstate(all="raise"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert math.isnan(cm.miou) and math.isnan(cm.pixel_accuracy) and math.isnan(cm.coverage)
            s = cm.summary()
    assert s["pixels"] == 0 and math.isnan(s["mean_recall"])


def test_ignore_handling():
    gt = np.full((3, 3), 255, dtype=np.uint8)
    pred = np.zeros((3, 3), dtype=np.uint8)
    cm = ConfusionMatrix(3).update(gt, pred)
    assert cm.mat.sum() == 0 and cm.ignored == 9 and cm.total_pixels == 0
    # a custom ignore index; 255 then is an invalid gt value
    cm = ConfusionMatrix(3, ignore_index=0).update(np.array([0, 1, 2]), np.array([2, 1, 1]))
    np.testing.assert_array_equal(cm.mat, [[0, 0, 0], [0, 1, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(3, ignore_index=0).update(np.array([255]), np.array([1]))
    # ignore_index=None: every gt value must be a class
    cm = ConfusionMatrix(3, ignore_index=None).update(np.array([0, 2]), np.array([0, 2]))
    assert cm.total_pixels == 2


def test_out_of_range_predictions_are_unlabelled():
    gt = np.array([[0, 1, 1], [2, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 255, 1], [2, 7, 3]], dtype=np.uint8)
    cm = ConfusionMatrix(3).update(gt, pred)
    np.testing.assert_array_equal(cm.mat, np.eye(3, dtype=np.int64))
    np.testing.assert_array_equal(cm.unlabelled, [0, 1, 1])
    assert cm.total_pixels == 5 and cm.labelled_pixels == 3 and cm.ignored == 1
    assert cm.coverage == pytest.approx(3 / 5)
    assert cm.confident_pixel_accuracy == 1.0
    assert cm.pixel_accuracy == pytest.approx(3 / 5)
    # default: a pixel without prediction is a miss for its gt class
    _eq(cm.iou(), [1, 1 / 2, 1 / 2])
    assert cm.miou == pytest.approx(2 / 3)
    _eq(cm.recall(), [1, 1 / 2, 1 / 2])
    _eq(cm.precision(), [1, 1, 1])
    # confident pixels only
    _eq(cm.iou(confident_only=True), [1, 1, 1])
    _eq(cm.recall(confident_only=True), [1, 1, 1])
    assert cm.miou_confident == 1.0
    _eq(cm.class_coverage(), [1, 1 / 2, 1 / 2])
    # negative predictions in a signed array are unlabelled too
    cm = ConfusionMatrix(3).update(np.array([0, 1], dtype=np.int64), np.array([-1, 1], dtype=np.int64))
    np.testing.assert_array_equal(cm.unlabelled, [1, 0, 0])


def test_invalid_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        cm.update(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match=r"\[3\]"):
        cm.update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match=r"\[3\]"):  # value C next to ignored pixels
        cm.update(np.array([255, 3, 0], np.uint8), np.array([0, 0, 0], np.uint8))
    with pytest.raises(ValueError, match=r"\[300\]"):
        cm.update(np.array([255, 300]), np.array([0, 0]))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        cm.update(np.array([-1]), np.array([0]))
    with pytest.raises(TypeError, match="integer"):
        cm.update(np.zeros(3, np.uint8), np.zeros(3, np.float32))
    assert cm.num_images == 0 and cm.mat.sum() == 0
    with pytest.raises(ValueError):
        ConfusionMatrix(0)


def test_torch_and_bool_inputs():
    torch = pytest.importorskip("torch")
    cm = ConfusionMatrix(3).update(torch.from_numpy(GT), torch.from_numpy(PRED))
    assert cm == ConfusionMatrix(3).update(GT, PRED)
    cm = ConfusionMatrix(2).update(np.array([True, False]), np.array([True, True]))
    np.testing.assert_array_equal(cm.mat, [[0, 1], [0, 1]])


# ------------------------------------------------------------------------------------------
# confusion matrix: independent check, shards, serialisation, reports
# ------------------------------------------------------------------------------------------


def _random_pairs(rng, n, num_classes, shape=(23, 31)):
    pairs = []
    for _ in range(n):
        gt = rng.integers(0, num_classes, size=shape).astype(np.uint8)
        gt[rng.random(shape) < 0.1] = 255
        pred = rng.integers(0, num_classes, size=shape).astype(np.uint8)
        pred = np.where(rng.random(shape) < 0.5, np.where(gt == 255, 0, gt), pred).astype(np.uint8)
        pred[rng.random(shape) < 0.07] = 255  # no prediction
        pairs.append((gt, pred))
    return pairs


def _reference(pairs, num_classes, ignore=255):
    """Straightforward per-class loop with boolean masks."""
    tp = np.zeros(num_classes)
    gt_n = np.zeros(num_classes)
    pred_n = np.zeros(num_classes)
    labelled = total = 0
    for gt, pred in pairs:
        valid = gt != ignore
        total += valid.sum()
        labelled += (valid & (pred < num_classes)).sum()
        for c in range(num_classes):
            g = (gt == c) & valid
            p = (pred == c) & valid
            tp[c] += (g & p).sum()
            gt_n[c] += g.sum()
            pred_n[c] += p.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (gt_n + pred_n - tp)
        return dict(
            iou=iou,
            precision=tp / pred_n,
            recall=tp / gt_n,
            miou=np.nanmean(iou),
            acc=tp.sum() / total,
            coverage=labelled / total,
        )


def test_matches_independent_per_class_loop():
    rng = np.random.default_rng(12345)
    pairs = _random_pairs(rng, 20, 6)
    # one class never occurs in gt, one never in pred
    for gt, pred in pairs:
        gt[gt == 4] = 0
        pred[pred == 5] = 1
    cm, ba = evaluate_pairs(pairs, 6)
    assert ba is None
    ref = _reference(pairs, 6)
    _eq(cm.iou(), ref["iou"])
    _eq(cm.precision(), ref["precision"])
    _eq(cm.recall(), ref["recall"])
    assert abs(cm.miou - ref["miou"]) < 1e-12
    assert abs(cm.pixel_accuracy - ref["acc"]) < 1e-12
    assert abs(cm.coverage - ref["coverage"]) < 1e-12
    assert cm.num_images == 20


def test_merge_of_shards_equals_one_pass():
    rng = np.random.default_rng(7)
    pairs = _random_pairs(rng, 9, 5)
    whole, _ = evaluate_pairs(pairs, 5)
    a, _ = evaluate_pairs(pairs[:4], 5)
    b, _ = evaluate_pairs(pairs[4:], 5)
    assert a + b == whole
    assert a != whole
    assert ConfusionMatrix.sum([a, b]) == whole
    c = a.copy()
    c += b
    assert c == whole and a != whole  # + and copy leave the operands alone
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(4))
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(5, ignore_index=0))


def test_summary_and_per_class_table():
    cm = ConfusionMatrix(3).update(GT, PRED)
    names = ["background", "cat", "dog"]
    s = cm.summary(names)
    assert all(np.isscalar(v) for v in s.values())
    assert s["miou"] == pytest.approx(4 / 9)
    assert s["iou.cat"] == pytest.approx(1 / 3)
    assert s["precision.dog"] == pytest.approx(1 / 2)
    assert s["recall.background"] == pytest.approx(1 / 2)
    for key in ("coverage", "pixel_accuracy", "mean_precision", "mean_recall", "unlabelled_pixels", "num_images"):
        assert key in s
    nested = cm.summary(names, flat=False)
    assert nested["iou"]["cat"] == pytest.approx(1 / 3)
    assert cm.summary()["iou.1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="class names"):
        cm.summary(["a", "b"])
    t = cm.per_class_table(names)
    assert isinstance(t, pd.DataFrame)
    assert list(t.columns[:6]) == ["class", "iou", "precision", "recall", "gt_pixels", "pred_pixels"]
    assert t["gt_pixels"].tolist() == [2, 2, 1] and t["pred_pixels"].tolist() == [1, 2, 2]


def test_write_metrics_csv(tmp_path):
    cm = ConfusionMatrix(4).update(GT, PRED)  # class 3 -> NaN
    row = {"stage": "cam", "threshold": 0.15, **cm.summary(["bg", "a", "b", "c"])}
    path = tmp_path / "sub" / "metrics.csv"
    write_metrics_csv(path, row)
    df = pd.read_csv(path)
    assert len(df) == 1 and list(df.columns) == list(row)
    assert df.loc[0, "miou"] == row["miou"]  # full precision kept
    assert math.isnan(df.loc[0, "iou.c"])
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]  # no temp file left
    write_metrics_csv(path, [{"a": 1, "b": 2.5}, {"a": 2, "c": "x"}])
    df = pd.read_csv(path)
    assert list(df.columns) == ["a", "b", "c"] and math.isnan(df.loc[1, "b"])
    with pytest.raises(ValueError, match="non-scalar"):
        write_metrics_csv(path, cm.summary(flat=False))


# ------------------------------------------------------------------------------------------
# boundaries
# ------------------------------------------------------------------------------------------


def _square(shape, r0, r1, c0, c1):
    m = np.zeros(shape, dtype=bool)
    m[r0 : r1 + 1, c0 : c1 + 1] = True
    return m


def test_boundary_map_by_hand():
    m = _square((5, 5), 1, 2, 1, 2)
    expected = np.zeros((5, 5), dtype=bool)
    for y, x in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]:
        expected[y, x] = True
    np.testing.assert_array_equal(boundary_map(m), expected)
    assert not boundary_map(np.ones((4, 4))).any()  # edges on the image border are not boundaries
    assert not boundary_map(np.zeros((4, 4))).any()
    with pytest.raises(ValueError):
        boundary_map(np.zeros((2, 2, 2)))


def test_tolerance_and_disk():
    assert boundary_tolerance((375, 500)) == 5  # ceil(0.008 * 625)
    assert boundary_tolerance((500, 375), 0.008) == 5
    assert boundary_tolerance((10, 10), 0.0) == 0
    assert boundary_tolerance((10, 10), 0.05) == 1  # ceil(0.707)
    assert boundary_tolerance((1000, 1000), 3) == 3
    with pytest.raises(ValueError):
        boundary_tolerance((10, 10), 2.5)
    np.testing.assert_array_equal(disk(1), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    assert disk(0).tolist() == [[True]]
    assert disk(2).sum() == 13


def _dilate_reference(m, r):
    k = disk(r)
    h, w = m.shape
    out = np.zeros_like(m)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if not k[dy + r, dx + r] or abs(dy) >= h or abs(dx) >= w:
                continue
            shifted = np.zeros_like(m)
            shifted[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = m[
                max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
            ]
            out |= shifted
    return out


@pytest.mark.parametrize("r", [0, 1, 2, 3, 5, 8, 40])
def test_dilate_disk_matches_shifted_or(r):
    rng = np.random.default_rng(r)
    m = rng.random((17, 29)) < 0.03
    np.testing.assert_array_equal(dilate_disk(m, r), _dilate_reference(m, r))


def test_boundary_f_score_identical_and_shifted_squares():
    a = _square((10, 10), 2, 5, 2, 5)
    b = _square((10, 10), 2, 5, 3, 6)  # shifted right by 1 px
    assert boundary_f_score(a, a) == 1.0
    assert boundary_f_score(b, a, bound_th=1) == 1.0
    # tolerance 0: the 16-pixel boundaries (5x5 perimeters at rows/cols 1..5 and 1..5 / 2..6)
    # share rows 1 and 5 at columns 2..5 -> 8 matches each way: P = R = F = 1/2
    s = boundary_prf(b, a, bound_th=0)
    assert (s.f, s.precision, s.recall) == (0.5, 0.5, 0.5)
    assert boundary_counts(boundary_map(b), boundary_map(a), 0) == (8, 8, 16, 16)
    # diagonal shift with a cross-shaped disk(1): corners miss
    c = _square((10, 10), 3, 6, 3, 6)
    assert boundary_f_score(c, a, bound_th=1) < 1.0
    assert boundary_f_score(c, a, bound_th=2) == 1.0


def test_boundary_empty_conventions():
    z = np.zeros((8, 8), dtype=bool)
    a = _square((8, 8), 2, 4, 2, 4)
    assert boundary_prf(z, z) == (1.0, 1.0, 1.0)
    assert boundary_prf(z, a) == (0.0, 1.0, 0.0)  # nothing predicted
    assert boundary_prf(a, z) == (0.0, 0.0, 1.0)  # nothing in gt
    assert boundary_f_score(np.ones((8, 8)), np.ones((8, 8))) == 1.0  # both boundaries empty
    with pytest.raises(ValueError, match="shape"):
        boundary_f_score(z, np.zeros((8, 9)))


def test_boundary_void_removed_from_both_masks():
    gt_obj = _square((10, 10), 3, 6, 3, 6)
    ring = _square((10, 10), 2, 7, 2, 7) & ~gt_obj
    pred = _square((10, 10), 2, 7, 2, 7)
    assert boundary_f_score(pred, gt_obj, bound_th=1, void=ring) == 1.0


# ------------------------------------------------------------------------------------------
# J & F accumulator
# ------------------------------------------------------------------------------------------


def test_jf_small_case_by_hand():
    # image 1: class 1 predicted exactly; class 2 a false positive single pixel -> J = F = 0
    gt1 = np.zeros((6, 6), dtype=np.uint8)
    gt1[1:3, 1:3] = 1
    pred1 = gt1.copy()
    pred1[4, 4] = 2
    # image 2: a 4x4 square of class 1 shifted right by 1 px -> J = 12/20, F = 1 at 1 px
    gt2 = _square((10, 10), 2, 5, 2, 5).astype(np.uint8)
    pred2 = _square((10, 10), 2, 5, 3, 6).astype(np.uint8)
    acc = BoundaryAccumulator(3, bound_th=1)
    assert acc.update(gt1, pred1) == [(1, 1.0, 1.0), (2, 0.0, 0.0)]
    assert acc.update(gt2, pred2) == [(1, 0.6, 1.0)]
    s = acc.summary(["bg", "a", "b"])
    assert s["pairs"] == 3 and s["num_images"] == 2
    assert s["J_mean"] == pytest.approx(1.6 / 3)
    assert s["F_mean"] == pytest.approx(2 / 3)
    assert s["JF"] == pytest.approx(0.6)
    assert s["J.a"] == pytest.approx(0.8) and s["F.a"] == 1.0
    assert s["J.b"] == 0.0 and s["F.b"] == 0.0 and math.isnan(s["J.bg"])
    assert s["J_class_mean"] == pytest.approx(0.4) and s["F_class_mean"] == pytest.approx(0.5)
    # pooled (HFPL): class 1 all contours matched; class 2 has no gt contour at all -> 0
    assert s["F_pooled.a"] == 1.0 and s["F_pooled.b"] == 0.0 and s["F_pooled_mean"] == 0.5
    # background included: image 1 bg exact, image 2 bg J = 80/88 (100 px; squares' union 20, intersection 12)
    accb = BoundaryAccumulator(3, bound_th=1, include_background=True)
    accb.update(gt1, pred1)
    r = accb.update(gt2, pred2)
    assert r[0][0] == 0 and r[0][1] == pytest.approx(80 / 88)


def test_jf_void_modes():
    gt = _square((10, 10), 3, 6, 3, 6).astype(np.uint8)
    gt[_square((10, 10), 2, 7, 2, 7) & (gt == 0)] = 255
    pred = _square((10, 10), 2, 7, 2, 7).astype(np.uint8)
    excl = BoundaryAccumulator(2, bound_th=1)
    assert excl.update(gt, pred) == [(1, 1.0, 1.0)]
    hfpl = BoundaryAccumulator(2, bound_th=1, void="background")
    [(k, j, f)] = hfpl.update(gt, pred)
    # gt 4x4 (16 px) vs pred 6x6 (36 px); contours: pred 24 px, 4 corners unmatched by the
    # cross-shaped 1-px disk -> P = 20/24, R = 1, F = 10/11
    assert k == 1 and j == pytest.approx(16 / 36) and f == pytest.approx(10 / 11)
    with pytest.raises(ValueError):
        BoundaryAccumulator(2, void="ignore")


def test_jf_prediction_only_in_void_or_unlabelled():
    gt = np.zeros((8, 8), dtype=np.uint8)
    gt[2:5, 2:5] = 255
    pred = np.zeros((8, 8), dtype=np.uint8)
    pred[2:5, 2:5] = 1  # class 1 predicted only on void pixels: no pair
    pred[0, 0] = 255  # no prediction: not a class
    acc = BoundaryAccumulator(2)
    assert acc.update(gt, pred) == []
    assert math.isnan(acc.summary()["J_mean"])


def test_jf_merge():
    rng = np.random.default_rng(11)
    pairs = []
    for _ in range(6):
        gt = np.zeros((40, 50), dtype=np.uint8)
        for c in rng.choice(np.arange(1, 4), size=2, replace=False):
            y, x = rng.integers(0, 30), rng.integers(0, 40)
            gt[y : y + 10, x : x + 12] = c
        pred = np.roll(gt, rng.integers(-2, 3), axis=1)
        pred[rng.random(gt.shape) < 0.02] = 255
        gt[rng.random(gt.shape) < 0.02] = 255
        pairs.append((gt, pred))
    cm, whole = evaluate_pairs(pairs, 4, with_boundary=True, include_background=True)
    _, a = evaluate_pairs(pairs[:2], 4, with_boundary=True, include_background=True)
    _, b = evaluate_pairs(pairs[2:], 4, with_boundary=True, include_background=True)
    merged = (a + b).summary()
    for k, v in whole.summary().items():
        assert merged[k] == pytest.approx(v, nan_ok=True), k
    with pytest.raises(ValueError):
        a.merge(BoundaryAccumulator(4, bound_th=0.01, include_background=True))
    # per-pair J equals the IoU from a per-image confusion matrix restricted to present classes
    gt, pred = pairs[0]
    acc = BoundaryAccumulator(4, include_background=True)
    one = ConfusionMatrix(4).update(gt, pred)
    for k, j, _ in acc.update(gt, pred):
        assert j == pytest.approx(one.iou()[k], abs=1e-12)


def test_jf_input_checks():
    acc = BoundaryAccumulator(3)
    with pytest.raises(ValueError, match="shapes differ"):
        acc.update(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        acc.update(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="without with_boundary"):
        evaluate_pairs([], 3, bound_th=0.01)
