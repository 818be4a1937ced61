"""IRN: path index, affinity labels, losses, network freezing, random walk (sparse vs dense), IR labels,
training data, engine training + resume, mean shift, inference and the stage functions."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss.cams import CamShardWriter, CamStore
from wsss.config import section_defaults
from wsss.io import read_label_png, write_label_png
from wsss.refine.irn import (
    EPS,
    IRLabelParams,
    IRNInferParams,
    IRNMethod,
    IRNTrainParams,
    IRNTrainSet,
    affinity_labels,
    boundary_map,
    cam_to_ir_label,
    compute_mean_shift,
    irn_loss_terms,
    irn_pseudo_label,
    load_irn,
    make_ir_labels,
    make_irn_masks,
    pair_displacement,
    save_irn,
    train_irn,
)
from wsss.refine.path_index import PathIndex, direction_path, search_directions
from wsss.refine.random_walk import (
    confidence_mask,
    outline_boundary_map,
    random_walk_dense,
    random_walk_sparse,
    sem_seg_from_walk,
    transition_stencil,
)

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


class FakeDS:
    """The part of the SegDataset interface the IRN stages use."""

    def __init__(self, images):
        self.images = dict(images)

    def load_image(self, image_id):
        return self.images[image_id]

    def image_path(self, image_id):
        return Path(f"/fake/{image_id}.jpg")


def random_images(n, size=(40, 52), seed=0):
    rng = np.random.default_rng(seed)
    return {f"im{i}": rng.integers(0, 256, size + (3,), dtype=np.uint8) for i in range(n)}


def identity_crf(img, labels, n_labels, **kw):
    assert img.dtype == np.uint8 and img.shape[:2] == labels.shape
    assert labels.max() < n_labels
    return labels.astype(np.uint8)


# small label map used by several tests (radius 2: 4 directions, 4 sources on 3x4)
LABEL_3x4 = np.array([[0, 0, 1, 1], [0, 255, 1, 1], [2, 2, 2, 255]], dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# path index
# ------------------------------------------------------------------------------------------------


def test_direction_counts_and_reference_sizes():
    assert len(search_directions(10)) == 152
    assert len(search_directions(5)) == 34
    pi = PathIndex(10, (128, 128))
    assert pi.num_directions == 152 and pi.num_sources == 119 * 110 == 13090
    assert len(pi.path_groups) == 20 and pi.path_lengths[0] == 2 and pi.path_lengths[-1] == 22
    pi5 = PathIndex(5, (20, 30))
    assert pi5.num_directions == 34 and len(pi5.path_groups) == 9 and pi5.radius_floor == 4
    # every direction once, all in the forward half plane, inside the radius
    d = pi.directions
    assert len({tuple(x) for x in d.tolist()}) == 152
    assert np.all((d[:, 0] > 0) | ((d[:, 0] == 0) & (d[:, 1] > 0)))
    assert np.all(d[:, 0] ** 2 + d[:, 1] ** 2 < 100)
    # canonical order = group order: path lengths never decrease
    lengths = [len(direction_path(*x)) for x in d.tolist()]
    assert lengths == sorted(lengths)


def test_hand_checked_paths():
    # (2, 3): points with (2x - 3y)^2 / 13 < 1 in the box [0,2]x[0,3], by decreasing |y|+|x|,
    # ties in row-major order; first = destination, last = source
    expected = [(2, 3), (1, 3), (2, 2), (1, 2), (1, 1), (0, 1), (1, 0), (0, 0)]
    assert [tuple(p) for p in direction_path(2, 3).tolist()] == expected
    assert [tuple(p) for p in direction_path(0, 3).tolist()] == [(0, 3), (0, 2), (0, 1), (0, 0)]
    assert [tuple(p) for p in direction_path(1, -1).tolist()] == [(1, -1), (0, -1), (1, 0), (0, 0)]
    pi = PathIndex(2, (3, 4))
    assert pi.directions.tolist() == [[0, 1], [1, 0], [1, -1], [1, 1]]  # groups: length 2, then 4
    assert pi.path_lengths == [2, 4]
    assert pi.src_indices.tolist() == [1, 2, 5, 6]  # y in [0, 2), x in [1, 3)
    assert pi.dst_indices.tolist() == [[2, 3, 6, 7], [5, 6, 9, 10], [4, 5, 8, 9], [6, 7, 10, 11]]
    # full index arrays: group 1, direction (1, -1), source 1 = (0, 1): pixels (1,0),(0,0),(1,1),(0,1)
    assert pi.path_indices()[1][0, :, 0].tolist() == [4, 0, 5, 1]


def test_too_small_map_is_refused():
    with pytest.raises(ValueError, match="too small"):
        PathIndex(10, (16, 16))


def test_edge_to_affinity_hand_and_brute_force():
    b = torch.zeros(3, 4)
    b[1, 1] = 0.8
    b[0, 3] = 0.3
    pi = PathIndex(2, (3, 4))
    aff = pi.edge_to_affinity(b)
    assert aff.shape == (4, 4)
    # source (0,1) [col 0], direction (1,1) [row 3]: path (0,1),(0,2),(1,1),(1,2) -> 1 - 0.8
    assert aff[3, 0].item() == pytest.approx(0.2)
    # source (0,2) [col 1], direction (0,1) [row 0]: (0,2),(0,3) -> 1 - 0.3
    assert aff[0, 1].item() == pytest.approx(0.7)
    # source (1,2) [col 3], direction (1,0): (1,2),(2,2) -> 1
    assert aff[1, 3].item() == pytest.approx(1.0)
    # brute force over every pair on a random map, radius 5
    g = torch.Generator().manual_seed(0)
    bm = torch.rand(2, 11, 13, generator=g)
    pi5 = PathIndex(5, (11, 13))
    got = pi5.edge_to_affinity(bm[:, None])
    rf = pi5.radius_floor
    bn = bm.numpy()
    want = np.zeros((2, pi5.num_directions, pi5.num_sources), np.float32)
    for j, (dy, dx) in enumerate(pi5.directions.tolist()):
        path = direction_path(dy, dx).tolist()
        for m, (y, x) in enumerate([(y, x) for y in range(11 - rf) for x in range(rf, 13 - rf)]):
            want[:, j, m] = 1 - np.max([bn[:, y + py, x + px] for py, px in path], axis=0)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# affinity labels and losses
# ------------------------------------------------------------------------------------------------


def test_affinity_labels_hand_counts():
    pi = PathIndex(2, (3, 4))
    bg, fg, neg = affinity_labels(torch.as_tensor(LABEL_3x4), pi)
    # worked out by hand (sources (0,1),(0,2),(1,1),(1,2); directions (0,1),(1,0),(1,-1),(1,1)):
    # (0,1)=0: ->(0,2)=1 neg, ->(1,1)=255 -, ->(1,0)=0 bg_pos, ->(1,2)=1 neg
    # (0,2)=1: ->(0,3) fg, ->(1,2) fg, ->(1,1) -, ->(1,3) fg;  (1,1)=255: nothing
    # (1,2)=1: ->(1,3)=1 fg, ->(2,2)=2 neg, ->(2,1)=2 neg, ->(2,3)=255 -
    assert (bg.sum().item(), fg.sum().item(), neg.sum().item()) == (1, 4, 4)
    assert bg[2, 0] == 1
    assert fg[:, 1].tolist() == [1, 1, 0, 1] and fg[:, 3].tolist() == [1, 0, 0, 0]
    assert neg[:, 0].tolist() == [1, 0, 0, 1] and neg[:, 3].tolist() == [0, 1, 1, 0]
    assert (bg + fg + neg)[:, 2].sum() == 0  # source 255
    assert torch.all(bg + fg + neg <= 1)


def test_loss_terms_hand_values():
    pi = PathIndex(2, (3, 4))
    label = torch.as_tensor(LABEL_3x4)[None]
    ys, xs = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    disp = -torch.stack([ys, xs])[None]  # D(p) = -p: every pair has delta = its direction
    edge = torch.zeros(1, 1, 3, 4)  # boundary 0.5 everywhere -> affinity 0.5
    t = irn_loss_terms(edge, disp, label, pi)
    v = -math.log(0.5 + EPS)
    assert t["pos_bg"].item() == pytest.approx(v * 1 / (1 + EPS))
    assert t["pos_fg"].item() == pytest.approx(v * 4 / (4 + EPS))
    assert t["pos"].item() == pytest.approx((t["pos_bg"] + t["pos_fg"]).item() / 2)
    assert t["neg"].item() == pytest.approx(-math.log(1 + EPS - 0.5) * 4 / (4 + EPS))
    assert t["dp_fg"].item() == pytest.approx(0.0, abs=1e-7)
    # the one bg pair has direction (1,-1): |delta| summed over both channels = 2
    assert t["dp_bg"].item() == pytest.approx(2 / (2 + EPS))
    # zero displacement: fg pairs (0,1),(1,0),(1,1) from (0,2) and (0,1) from (1,2) -> 1+1+2+1
    t0 = irn_loss_terms(edge, torch.zeros(1, 2, 3, 4), label, pi)
    assert t0["dp_fg"].item() == pytest.approx(5 / (8 + EPS))
    assert t0["dp_bg"].item() == pytest.approx(0.0)
    # a hard boundary at (1,1): sigmoid(+30) ~ 1, elsewhere ~ 0
    edge_b = torch.full((1, 1, 3, 4), -30.0)
    edge_b[0, 0, 1, 1] = 30.0
    tb = irn_loss_terms(edge_b, disp, label, pi)
    # bg pair (0,1)->(1,0) passes (1,1): affinity ~0 -> -log(1e-5); fg pairs avoid (1,1) except
    # (0,2)->(1,3)? its path is (0,2),(0,3),(1,2),(1,3): no. So fg affinity ~1
    assert tb["pos_bg"].item() == pytest.approx(-math.log(EPS), rel=1e-3)
    assert tb["pos_fg"].item() == pytest.approx(0.0, abs=1e-4)
    # negative pairs: (0,1)->(0,2) no, (0,1)->(1,2) via (1,1) yes, (1,2)->(2,2) no, (1,2)->(2,1) via (1,1) yes
    assert tb["neg"].item() == pytest.approx(2 * -math.log(1 + EPS) / 4 + 2 * -math.log(1 + EPS - 1) / 4, rel=1e-3)


def test_pair_displacement_sign():
    pi = PathIndex(2, (3, 4))
    disp = torch.zeros(1, 2, 3, 4)
    disp[0, 0, 1, 1] = 5.0  # D_y at pixel (1,1) = flat index 5 = source column 2
    delta = pair_displacement(disp, pi)
    assert delta.shape == (1, 2, 4, 4)
    want = torch.zeros(4, 4)
    want[:, 2] = 5.0  # D(s) - D(t) with s = (1,1), every direction
    want[1, 0] = -5.0  # s = (0,1), direction (1,0): t = (1,1)
    want[2, 1] = -5.0  # s = (0,2), direction (1,-1): t = (1,1)
    torch.testing.assert_close(delta[0, 0], want)
    assert not delta[0, 1].any()


def _weighted_terms_sum(method, batch):
    terms = method.losses(batch, None)
    assert set(terms) == {"pos", "neg", "dp_fg", "dp_bg"}
    return terms


def test_losses_are_weighted_as_reference_and_only_branches_get_gradients():
    torch.manual_seed(0)
    m = IRNMethod("resnet18", pretrained="none", radius=5)
    m.train()
    assert not m.backbone.training and m.training
    x = torch.randn(2, 3, 64, 64)
    label = torch.randint(0, 3, (2, 16, 16))
    label[:, :2] = 255
    terms = _weighted_terms_sum(m, {"image": x, "label": label})
    raw = m.last_components
    total = sum(terms.values())
    want = (raw["pos"] + raw["neg"]) / 2 + (raw["dp_fg"] + raw["dp_bg"]) / 2
    assert total.item() == pytest.approx(want, rel=1e-5)
    assert raw["pos"] == pytest.approx((raw["pos_bg"] + raw["pos_fg"]) / 2, rel=1e-6)
    total.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.backbone.parameters())
    groups = {g["name"]: g for g in m.param_groups()}
    assert groups["edge"]["lr_mult"] == 1.0 and groups["displacement"]["lr_mult"] == 10.0
    for g in groups.values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g["params"])
    n_branch = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_branch == sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_trainable_from_fine_tunes_the_backbone_from_that_stage():
    torch.manual_seed(0)
    m = IRNMethod("resnet18", pretrained="none", radius=5, trainable_from="stage3")
    m.train()
    assert not m.backbone.training  # BatchNorm statistics stay fixed
    x = torch.randn(2, 3, 64, 64)
    label = torch.randint(0, 3, (2, 16, 16))
    sum(_weighted_terms_sum(m, {"image": x, "label": label}).values()).backward()
    bb = m.backbone
    for name, mods in bb.stage_modules():
        params = [p for mod in mods for p in mod.parameters() if not isinstance(mod, torch.nn.BatchNorm2d)]
        convs = [p for p in params if p.dim() == 4]
        if name in ("stage1", "stage2"):
            assert all(p.grad is None and not p.requires_grad for p in params), name
        else:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in convs), name
    assert all(
        not p.requires_grad for mod in bb.modules() if isinstance(mod, torch.nn.BatchNorm2d) for p in mod.parameters()
    )
    groups = {g["name"]: g for g in m.param_groups()}
    assert groups["backbone"]["lr_mult"] == 1.0
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in bb.parameters() if p.requires_grad}
    n_trained = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_trained == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert m.arch()["trainable_from"] == "stage3"
    with pytest.raises(ValueError, match="unknown trainable_from 'layer9'.*stage1"):
        IRNMethod("resnet18", pretrained="none", trainable_from="layer9")
    from wsss.models.backbones import build_backbone

    built = build_backbone("resnet18", trainable_from="stage3")  # a backbone object must agree
    with pytest.raises(ValueError, match="trainable_from 'stage1', but the given backbone trains from 'stage3'"):
        IRNMethod(built, trainable_from="stage1")
    assert IRNMethod(built, trainable_from="stage3").trainable_from == "stage3"


def test_resnet50_branch_shapes_and_channels():
    m = IRNMethod("resnet50", pretrained="none")
    assert m.edge6.in_channels == 160 and m.edge6.bias is not None
    assert [
        m.dp1[0].in_channels,
        m.dp2[0].in_channels,
        m.dp3[0].in_channels,
        m.dp4[0].in_channels,
        m.dp5[0].in_channels,
    ] == [64, 256, 512, 1024, 2048]
    assert m.dp1[1].num_groups == 8 and m.dp2[1].num_groups == 16 and m.edge1[1].num_groups == 4
    assert m.dp7[0][0].in_channels == 448 and m.dp7[1].out_channels == 2 and m.dp7[1].bias is None
    edge, disp = m(torch.zeros(1, 3, 72, 88))
    assert edge.shape == (1, 1, 18, 22) and disp.shape == (1, 2, 18, 22)


def test_mean_shift_identity_in_training_subtracts_in_eval():
    m = IRNMethod("resnet18", pretrained="none", radius=5)
    m.mean_shift.running_mean.copy_(torch.tensor([1.5, -2.0]))
    x = torch.randn(1, 3, 32, 32)
    m.train()
    _, d_train = m(x)
    m.eval()
    _, d_eval = m(x)
    _, raw = m.branches(x)
    torch.testing.assert_close(d_train, raw)
    torch.testing.assert_close(d_eval, raw - torch.tensor([1.5, -2.0]).view(1, 2, 1, 1))


# ------------------------------------------------------------------------------------------------
# random walk
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_walk_matches_dense(seed):
    g = torch.Generator().manual_seed(seed)
    cam = torch.rand(2, 12, 15, generator=g)
    edge = torch.rand(12, 15, generator=g) ** 3
    dense = random_walk_dense(cam, edge, radius=5, beta=10, exp_times=8)
    sparse = random_walk_sparse(cam, edge, radius=5, beta=10, exp_times=8)
    assert sparse.dtype == torch.float32 and sparse.shape == (2, 12, 15)
    assert (dense / dense.max() - sparse / sparse.max()).abs().max() < 1e-4
    ld, _ = sem_seg_from_walk(dense, [3, 7], (45, 58))
    ls, _ = sem_seg_from_walk(sparse, [3, 7], (45, 58))
    assert np.array_equal(ld, ls)
    assert set(np.unique(ls)) <= {0, 4, 8} and len(np.unique(ls)) > 1
    # in float64 both formulations agree to rounding
    d64 = random_walk_dense(cam.double(), edge.double(), 5, 10, 8)
    s64 = random_walk_sparse(cam.double(), edge.double(), 5, 10, 8)
    torch.testing.assert_close(s64, d64, rtol=1e-9, atol=1e-12)


def test_walk_one_step_and_stencil_is_column_stochastic():
    g = torch.Generator().manual_seed(5)
    edge = torch.rand(9, 11, generator=g)
    offsets, weights, self_w = transition_stencil(edge.double(), 5, 10.0)
    assert len(offsets) == 68
    # every column of T sums to 1: self weight + neighbour weights at each target pixel
    torch.testing.assert_close(self_w + weights.sum(0), torch.ones(9, 11, dtype=torch.float64))
    cam = torch.rand(3, 9, 11, generator=g)
    for k in (0, 1, 2):
        torch.testing.assert_close(
            random_walk_sparse(cam, edge, 5, 10, k), random_walk_dense(cam, edge, 5, 10, k), rtol=1e-5, atol=1e-6
        )
    # no boundary at all: a constant map stays constant (T is an average)
    flat = random_walk_sparse(torch.ones(1, 9, 11), torch.zeros(9, 11), 5, 10, 3)
    torch.testing.assert_close(flat, torch.ones(1, 9, 11))


def test_boundary_blocks_propagation():
    # a vertical wall of boundary between two halves: the left CAM must not leak to the right
    cam = torch.zeros(1, 10, 20)
    cam[0, :, :4] = 1.0
    edge = torch.zeros(10, 20)
    edge[:, 9:11] = 1.0
    rw = random_walk_sparse(cam, edge, 5, 10, 6)
    assert rw[0, :, 12:].max() < 1e-6 and rw[0, :, :8].min() > 0.1


def test_sem_seg_from_walk_global_max_and_background():
    rw = torch.zeros(2, 2, 2)
    rw[0] = torch.tensor([[4.0, 0.5], [0.0, 0.0]])
    rw[1] = torch.tensor([[0.0, 2.0], [0.9, 0.0]])
    labels, scores = sem_seg_from_walk(rw, [4, 0], (8, 8), bg_thresh=0.25)
    assert labels.shape == (8, 8) and scores.shape == (3, 8, 8) and labels.dtype == np.uint8
    assert np.all(scores[0] == np.float32(0.25))
    assert scores[1:].max() == pytest.approx(1.0)  # global max, not per class
    assert labels[1, 1] == 5  # class key 4 -> id 5 (4/4 = 1.0 > 0.25)
    assert labels[1, 5] == 1  # key 0: 2/4 = 0.5 beats 0.5/4
    assert labels[7, 7] == 0  # nothing -> background
    empty_l, empty_s = sem_seg_from_walk(torch.zeros(0, 2, 2), [], (7, 6))
    assert empty_l.shape == (7, 6) and not empty_l.any() and empty_s.shape == (1, 7, 6)
    zero_l, _ = sem_seg_from_walk(torch.zeros(1, 2, 2), [3], (8, 8))
    assert not zero_l.any()  # all-zero scores: background, no NaN


def test_outline_boundary_map_hand():
    # 24 x 23 image: a square of class 2 at rows/cols 4-15, an ignore pixel at (22, 21)
    gt = np.zeros((24, 23), np.uint8)
    gt[4:16, 4:16] = 2
    gt[22, 21] = 255
    e = outline_boundary_map(gt, on=1.0, off=0.0)
    assert e.shape == (6, 6) and e.dtype == torch.float32  # ceil(24/4) x ceil(23/4)
    # class changes (3x3 neighbourhood) on rows/cols 3-4 and 15-16: every stride-4 cell holding one
    # is on; the square's inside (cell 2, 2) and the far background are off, the ignore pixel's cell is on
    ring = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    expected = torch.tensor([ring, ring, [1.0, 1.0, 0.0, 1.0, 1.0, 0.0], ring, ring, [0.0] * 5 + [1.0]])
    assert torch.equal(e, expected)
    assert torch.equal(outline_boundary_map(np.zeros((8, 8), np.uint8)), torch.full((2, 2), 0.05))
    with pytest.raises(ValueError, match="H x W"):
        outline_boundary_map(np.zeros((2, 8, 8), np.uint8))


def test_confidence_mask_hand():
    # 3 channels (bg 0.25 + 2 classes) on a 2x4 map; predictions: class 1 on the first row, bg/2 below
    s = np.zeros((3, 2, 4), np.float32)
    s[0] = 0.25
    s[1, 0] = [0.9, 0.5, 0.3, 0.6]  # margins vs bg: .65 .25 .05 .35 -> top 2 of 4: cols 0 and 3
    s[2, 1] = [0.3, 0.8, 0.2, 0.1]  # row 1: col0 cls2 (m .05), col1 cls2 (m .55), cols 2,3 bg (m .05, .15)
    conf = confidence_mask(s, 0.5)
    assert conf[0].tolist() == [True, False, False, True]
    # class-2 region {col0, col1}: 1 confident (col1); bg region {col2, col3}: 1 confident (col3)
    assert conf[1].tolist() == [False, True, False, True]
    assert not confidence_mask(s, 0.0).any()
    assert confidence_mask(s, 1.0).all()
    # a region of 3 pixels with ratio 0.5 -> floor(1.5) = 1
    one = np.zeros((2, 1, 3), np.float32)
    one[1] = [[0.5, 0.9, 0.7]]
    assert confidence_mask(one, 0.5).tolist() == [[False, True, False]]


# ------------------------------------------------------------------------------------------------
# IR labels
# ------------------------------------------------------------------------------------------------


def test_cam_to_ir_label_fake_crf():
    img = np.zeros((3, 4, 3), np.uint8)
    high = np.zeros((2, 3, 4), np.float32)
    high[0] = [[0.9, 0.4, 0.2, 0.0], [0.6, 0.1, 0.04, 0.0], [0.0, 0.0, 0.0, 0.0]]
    high[1] = [[0.0, 0.0, 0.25, 0.8], [0.0, 0.0, 0.0, 0.31], [0.06, 0.0, 0.02, 0.3]]
    calls = []

    def fake(im, labels, n_labels, **kw):
        calls.append((n_labels, kw))
        return labels

    out = cam_to_ir_label(img, high, [2, 14], fg_thresh=0.30, bg_thresh=0.05, crf_fn=fake, crf_params={"t": 3})
    want = np.array([[3, 3, 255, 15], [3, 255, 0, 15], [255, 0, 0, 255]], np.uint8)
    # (0,2): 0.25 < 0.30 but > 0.05 -> uncertain; (2,3): 0.3 is not > 0.30 (tie -> background) -> 255
    assert np.array_equal(out, want)
    assert calls == [(3, {"t": 3}), (3, {"t": 3})]
    # no classes: all background, no CRF call
    calls.clear()
    assert not cam_to_ir_label(img, np.zeros((0, 3, 4), np.float32), [], crf_fn=fake).any()
    assert calls == []
    # the CRF's output is what is used: a CRF that removes all foreground gives all-background
    out2 = cam_to_ir_label(img, high, [2, 14], crf_fn=lambda im, lab, n_labels: np.zeros_like(lab))
    assert not out2.any()


def test_cam_to_ir_label_real_crf():
    crf = pytest.importorskip("wsss.refine.crf")
    rng = np.random.default_rng(0)
    img = np.full((40, 50, 3), 30, np.uint8)
    img[10:30, 15:35] = (220, 40, 40)
    img = np.clip(img.astype(int) + rng.integers(-5, 6, img.shape), 0, 255).astype(np.uint8)
    high = np.zeros((1, 40, 50), np.float32)
    high[0, 12:28, 17:33] = 0.9  # slightly inside the red square
    high[0, 8:32, 13:37] = np.maximum(high[0, 8:32, 13:37], 0.1)
    out = cam_to_ir_label(img, high, [6], crf_fn=crf.crf_inference_label)
    assert set(np.unique(out)) <= {0, 7, 255}
    assert (out[14:26, 19:31] == 7).all()  # confident foreground inside
    assert (out[:4] == 0).all()  # far background stays confident background


def test_ir_label_params_validation():
    assert IRLabelParams.from_mapping(None) == IRLabelParams(0.30, 0.05, {})
    with pytest.raises(ValueError, match="unknown config key.*'fg'.*irn.ir_label"):
        IRLabelParams.from_mapping({"fg": 0.3})
    with pytest.raises(ValueError, match="irn.ir_label.crf"):
        IRLabelParams.from_mapping({"crf": {"sxy": 3}})
    with pytest.raises(ValueError, match="bg_thresh"):
        IRLabelParams.from_mapping({"fg_thresh": 0.1, "bg_thresh": 0.2})
    with pytest.raises(ValueError, match="irn.train.crop_size"):
        IRNTrainParams.from_mapping({"crop_size": 510})
    with pytest.raises(ValueError, match="irn.infer.walk"):
        IRNInferParams.from_mapping({"walk": "exact"})
    assert IRNTrainParams.from_mapping({"rescale": [0.7, 1.2]}).rescale == (0.7, 1.2)
    with pytest.raises(ValueError, match="irn.train.rescale"):
        IRNTrainParams.from_mapping({"rescale": [1.2, 0.7]})
    # no defaults of their own: every value comes from the schema (wsss.config.section_defaults)
    for cls, key in ((IRLabelParams, "irn.ir_label"), (IRNTrainParams, "irn.train"), (IRNInferParams, "irn.infer")):
        assert all(
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for f in dataclasses.fields(cls)
        )
        d = dataclasses.asdict(cls.from_mapping(None))
        assert {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()} == section_defaults(key)


#: Effective irn values of the default config (the schema's defaults); unchanged when the defaults
#: moved from the dataclasses into the schema (outputs must stay byte for byte the same).
IRN_DEFAULTS = {
    "irn.ir_label": {"fg_thresh": 0.3, "bg_thresh": 0.05, "crf": {}},
    "irn.train": {
        "backbone": "resnet18",
        "pretrained": "classifier",
        "trainable_from": None,
        "crop_size": 128,
        "rescale": [0.5, 1.5],
        "hflip": True,
        "radius": 10,
        "batch_size": 8,
        "epochs": 3,
        "optimizer": "sgd",
        "lr": 0.1,
        "edge_lr_mult": 1.0,
        "dp_lr_mult": 10.0,
        "weight_decay": 1e-4,
        "momentum_mode": "reference",
        "momentum": 0.9,
        "poly_power": 0.9,
        "amp": True,
        "seed": 0,
        "affinity_weight": 0.5,
        "displacement_weight": 0.5,
        "mean_shift_crop_size": 192,
        "mean_shift_batch_size": 8,
    },
    "irn.infer": {
        "radius": 5,
        "beta": 10.0,
        "exp_times": 8,
        "walk_size": 125,
        "bg_thresh": 0.25,
        "pad_to": 0,
        "walk": "sparse",
        "confidence_ratio": 0.5,
    },
}
#: IRN's reference values (configs/irn_reference.yaml): the defaults but for the CPU-size keys.
IRN_REFERENCE = {
    "irn.ir_label": {
        "crf": {"t": 10, "gt_prob": 0.7, "gauss_sxy": 3, "gauss_compat": 3, "bi_sxy": 50, "bi_srgb": 5, "bi_compat": 10}
    },
    "irn.train": {
        "backbone": "resnet50",
        "pretrained": "imagenet",
        "crop_size": 512,
        "batch_size": 32,
        "mean_shift_crop_size": 512,
        "mean_shift_batch_size": 32,
    },
    "irn.infer": {"pad_to": 512, "walk_size": None},
}


def test_irn_defaults_and_reference_recipe():
    import yaml

    from wsss.config import load_config_file

    root = Path(__file__).resolve().parents[1]
    cfg = load_config_file(root / "config.yaml")
    ref = load_config_file(root / "configs" / "irn_reference.yaml")
    for key, expect in IRN_DEFAULTS.items():
        sub = key.split(".")[1]
        assert section_defaults(key) == expect, key
        assert cfg["irn"][sub] == expect, key  # config.yaml shows the defaults
        assert ref["irn"][sub] == {**expect, **IRN_REFERENCE[key]}, key
    raw = yaml.safe_load((root / "configs" / "irn_reference.yaml").read_text())["irn"]
    assert all(set(raw[k.split(".")[1]]) == set(v) for k, v in IRN_DEFAULTS.items())  # the recipe names every key


def _cam_store(tmp_path, images, keys_of, seed=0):
    rng = np.random.default_rng(seed)
    path = tmp_path / "cams.h5"
    with CamShardWriter(path, config={"t": 1}, scales=[1.0], normalisation="max") as w:
        for i, img in images.items():
            h, wd = img.shape[:2]
            k = len(keys_of[i])
            w.add(
                i,
                np.asarray(keys_of[i], np.int64),
                rng.random((k, -(-h // 4), -(-wd // 4))).astype(np.float32),
                rng.random((k, h, wd)).astype(np.float32),
            )
    return CamStore(path)


def test_make_ir_labels_writes_and_resumes(tmp_path):
    images = random_images(3)
    keys_of = {"im0": [0], "im1": [1, 4], "im2": []}
    store = _cam_store(tmp_path, images, keys_of)
    calls = []

    def counting(img, labels, n_labels, **kw):
        calls.append(n_labels)
        return labels.astype(np.uint8)

    from wsss.workflow.journal import ShardJournal

    out = tmp_path / "ir"
    assert make_ir_labels(
        FakeDS(images),
        store,
        list(images),
        out,
        {"fg_thresh": 0.5, "bg_thresh": 0.2},
        crf_fn=counting,
        progress=False,
        journal=ShardJournal(tmp_path / "j", {"a": 1}),
    ) == {"written": 3, "skipped": 0}
    assert sorted(calls) == [2, 2, 3, 3]  # two CRFs per labelled image, none for the unlabelled one
    for i in images:
        lab = read_label_png(out / f"{i}.png")
        assert lab.shape == images[i].shape[:2]
        allowed = {0, 255} | {k + 1 for k in keys_of[i]}
        assert set(np.unique(lab)) <= allowed
    assert not read_label_png(out / "im2.png").any()
    # the label equals cam_to_ir_label on the stored CAMs
    rec = store.get("im1")
    want = cam_to_ir_label(images["im1"], rec.high_res, rec.keys, 0.5, 0.2, identity_crf)
    assert np.array_equal(read_label_png(out / "im1.png"), want)
    # the job was interrupted (journal not finished) and im0's PNG lost: only im0 is redone
    (out / "im0.png").unlink()
    calls.clear()
    assert make_ir_labels(
        FakeDS(images),
        store,
        list(images),
        out,
        {"fg_thresh": 0.5, "bg_thresh": 0.2},
        crf_fn=counting,
        progress=False,
        journal=ShardJournal(tmp_path / "j", {"a": 1}),
    ) == {"written": 1, "skipped": 2}
    assert calls == [2, 2]
    # another job identity (new inputs) or no journal: everything is redone
    calls.clear()
    assert make_ir_labels(
        FakeDS(images),
        store,
        list(images),
        out,
        {"fg_thresh": 0.5, "bg_thresh": 0.2},
        crf_fn=counting,
        progress=False,
        journal=ShardJournal(tmp_path / "j", {"a": 2}),
    ) == {"written": 3, "skipped": 0}
    assert make_ir_labels(
        FakeDS(images), store, list(images), out, {"fg_thresh": 0.5, "bg_thresh": 0.2}, crf_fn=counting, progress=False
    ) == {"written": 3, "skipped": 0}
    assert not list(out.glob(".tmp-*"))
    with pytest.raises(KeyError, match="no CAM"):
        make_ir_labels(FakeDS(images), store, ["nope"], out, None, crf_fn=counting, progress=False)


# ------------------------------------------------------------------------------------------------
# training data
# ------------------------------------------------------------------------------------------------


def test_train_set_joint_transform(tmp_path):
    h, w = 48, 60
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = 255  # bright left half = class 1, dark right half = class 2
    label = np.full((h, w), 2, np.uint8)
    label[:, : w // 2] = 1
    write_label_png(tmp_path / "a.png", label)
    ts = IRNTrainSet(FakeDS({"a": img}), ["a"], tmp_path, crop_size=64, rescale=(0.8, 1.6), hflip=True, seed=3)
    seen_flip = set()
    for epoch in range(8):
        ts.set_epoch(epoch)
        s = ts[0]
        x, lab = s["image"].numpy(), s["label"].numpy()
        assert x.shape == (3, 64, 64) and lab.shape == (16, 16) and lab.dtype == np.int64
        assert set(np.unique(lab)) <= {1, 2, 255}
        for y in range(1, 15):
            for xx in range(1, 15):
                block = lab[y - 1 : y + 2, xx - 1 : xx + 2]
                if (block != block[1, 1]).any():
                    continue  # near a label edge (bicubic ringing)
                v = x[0, 4 * y + 2, 4 * xx + 2]
                if block[1, 1] == 255:
                    assert v == 0.0  # padding of the image
                elif block[1, 1] == 1:
                    assert v > 1.5
                else:
                    assert v < -1.5
        left = lab[:, :2]
        seen_flip.add(bool((left == 2).any()))
        # deterministic: same (seed, epoch, index) -> same sample
        s2 = ts[0]
        assert torch.equal(s2["image"], s["image"]) and torch.equal(s2["label"], s["label"])
    assert seen_flip == {True, False}  # both orientations occur over the epochs


def test_train_set_label_size_mismatch(tmp_path):
    write_label_png(tmp_path / "a.png", np.zeros((10, 10), np.uint8))
    ts = IRNTrainSet(FakeDS({"a": np.zeros((12, 10, 3), np.uint8)}), ["a"], tmp_path, crop_size=32)
    with pytest.raises(Exception, match="a.png"):
        ts[0]


# ------------------------------------------------------------------------------------------------
# engine training, mean shift, inference, stages
# ------------------------------------------------------------------------------------------------

TRAIN_PARAMS = {
    "backbone": "resnet18",
    "pretrained": "none",
    "crop_size": 96,
    "radius": 10,
    "batch_size": 2,
    "epochs": 2,
    "lr": 0.01,
    "amp": False,
    "seed": 5,
    "mean_shift_crop_size": 64,
    "mean_shift_batch_size": 32,
}


def _ir_labels_on_disk(tmp_path, images, seed=0):
    rng = np.random.default_rng(seed)
    d = tmp_path / "ir"
    for i, img in images.items():
        lab = np.zeros(img.shape[:2], np.uint8)
        lab[:, img.shape[1] // 2 :] = rng.integers(1, 4)
        lab[: img.shape[0] // 3] = 255
        write_label_png(d / f"{i}.png", lab)
    return d


def test_train_irn_killed_in_the_mean_shift_resumes_without_retraining(tmp_path, monkeypatch):
    import wsss.refine.irn as irn_mod

    images = random_images(4, size=(70, 90))
    ds = FakeDS(images)
    labels = _ir_labels_on_disk(tmp_path, images)
    ids = list(images)
    real = irn_mod.compute_mean_shift

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(irn_mod, "compute_mean_shift", killed)
    args = (ds, ids, labels, tmp_path / "irn.pt", tmp_path / "w", TRAIN_PARAMS)
    with pytest.raises(KeyboardInterrupt):
        train_irn(*args, infer_ids=ids[:3], device=torch.device("cpu"), progress=False)
    assert (tmp_path / "w" / "last.pt").exists() and not (tmp_path / "irn.pt").exists()
    steps = (tmp_path / "w" / "train_log.csv").read_text().count("\n")
    monkeypatch.setattr(irn_mod, "compute_mean_shift", real)
    train_irn(*args, infer_ids=ids[:3], device=torch.device("cpu"), progress=False)
    assert (tmp_path / "w" / "train_log.csv").read_text().count("\n") == steps  # no step trained again
    assert load_irn(tmp_path / "irn.pt", torch.device("cpu")).state_dict()["mean_shift.running_mean"].abs().sum() > 0
    assert not (tmp_path / "w" / "last.pt").exists() and not (tmp_path / "w" / "trained.pt").exists()


def test_train_irn_with_engine_and_resume(tmp_path):
    images = random_images(4, size=(70, 90))
    ds = FakeDS(images)
    labels = _ir_labels_on_disk(tmp_path, images)
    ids = list(images)
    full = train_irn(
        ds,
        ids,
        labels,
        tmp_path / "a" / "irn.pt",
        tmp_path / "a",
        TRAIN_PARAMS,
        infer_ids=ids[:3],
        device=torch.device("cpu"),
        progress=False,
    )
    ck = train_irn(
        ds,
        ids,
        labels,
        tmp_path / "b" / "irn.pt",
        tmp_path / "b",
        TRAIN_PARAMS,
        infer_ids=ids[:3],
        device=torch.device("cpu"),
        progress=False,
        stop_after_epochs=1,
    )
    assert ck.name == "last.pt" and not (tmp_path / "b" / "irn.pt").exists()
    resumed = train_irn(
        ds,
        ids,
        labels,
        tmp_path / "b" / "irn.pt",
        tmp_path / "b",
        TRAIN_PARAMS,
        infer_ids=ids[:3],
        device=torch.device("cpu"),
        progress=False,
    )
    for work in (tmp_path / "a", tmp_path / "b"):  # no weights left behind once the model file is written
        assert not (work / "last.pt").exists() and not (work / "trained.pt").exists(), sorted(work.iterdir())
    a, b = load_irn(full, torch.device("cpu")), load_irn(resumed, torch.device("cpu"))
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    # the mean shift was computed (3 images < one batch of 32) and stored in the model state
    assert sa["mean_shift.running_mean"].abs().sum() > 0
    assert not a.training and a.backbone_name == "resnet18"
    with open(tmp_path / "b" / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert {"loss_pos", "loss_neg", "loss_dp_fg", "loss_dp_bg", "loss_total", "lr_edge", "lr_displacement"} <= set(
        rows[0]
    )
    assert float(rows[0]["lr_displacement"]) == pytest.approx(10 * float(rows[0]["lr_edge"]))
    for r in rows:
        parts = sum(float(r[f"loss_{k}"]) for k in ("pos", "neg", "dp_fg", "dp_bg"))
        assert float(r["loss_total"]) == pytest.approx(parts, rel=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        train_irn(ds, ids[:1], labels, tmp_path / "c.pt", tmp_path / "c", TRAIN_PARAMS, progress=False)


def test_mean_shift_on_list_smaller_than_a_batch():
    torch.manual_seed(0)
    m = IRNMethod("resnet18", pretrained="none", radius=5)
    images = random_images(3, size=(30, 41))
    mean = compute_mean_shift(m, FakeDS(images), list(images), crop_size=48, batch_size=32, device=torch.device("cpu"))
    # by hand: each image top-left in a 48x48 zero canvas, spatial mean of the raw displacement, mean over images
    from wsss.data.transforms import normalize

    per_image = []
    for img in images.values():
        canvas = np.zeros((48, 48, 3), np.float32)
        canvas[:30, :41] = normalize(img)
        with torch.no_grad():
            _, d = m.branches(torch.from_numpy(canvas.transpose(2, 0, 1)).unsqueeze(0))
        per_image.append(d.double().mean(dim=(2, 3))[0])
    torch.testing.assert_close(mean, torch.stack(per_image).mean(0).float())
    torch.testing.assert_close(m.mean_shift.running_mean, mean)
    with pytest.raises(ValueError, match="at least one"):
        compute_mean_shift(m, FakeDS(images), [], device=torch.device("cpu"))


def test_boundary_map_any_size_and_reference_padding():
    torch.manual_seed(1)
    m = IRNMethod("resnet18", pretrained="none", radius=5).eval()
    img = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    e = boundary_map(m, img, pad_to=64, device=torch.device("cpu"))
    assert e.shape == (10, 13) and float(e.min()) >= 0 and float(e.max()) <= 1
    # the reference computation: [img, flip] zero-padded to 64x64, logits cropped, flip-averaged
    from wsss.data.transforms import normalize

    x = torch.from_numpy(normalize(img).transpose(2, 0, 1).copy())
    pair = torch.nn.functional.pad(torch.stack([x, x.flip(-1)]), (0, 64 - 50, 0, 64 - 37))
    with torch.no_grad():
        logit, _ = m.branches(pair)
    logit = logit[:, 0, :10, :13]
    torch.testing.assert_close(e, torch.sigmoid(logit[0] / 2 + logit[1].flip(-1) / 2))
    # larger than pad_to: padded to a multiple of 16 instead of being cut
    big = boundary_map(m, img, pad_to=32, device=torch.device("cpu"))
    assert big.shape == (10, 13)


def test_pseudo_label_and_make_irn_masks(tmp_path):
    torch.manual_seed(2)
    m = IRNMethod("resnet18", pretrained="none", radius=5)
    m.eval()
    model = save_irn(tmp_path / "irn.pt", m, {"irn": {"test": 1}})
    images = random_images(3, size=(33, 45), seed=4)
    keys_of = {"im0": [2], "im1": [0, 5], "im2": []}
    store = _cam_store(tmp_path, images, keys_of, seed=1)
    params = {"exp_times": 4, "pad_to": 48}
    out, conf = tmp_path / "sem", tmp_path / "conf"
    from wsss.workflow.journal import ShardJournal

    res = make_irn_masks(
        FakeDS(images),
        store,
        list(images),
        model,
        out,
        params,
        conf_dir=conf,
        device=torch.device("cpu"),
        progress=False,
        journal=ShardJournal(tmp_path / "j", {"a": 1}),
    )
    assert res == {"written": 3, "skipped": 0}
    loaded = load_irn(model, torch.device("cpu"))
    for i, img in images.items():
        lab = read_label_png(out / f"{i}.png")
        c = read_label_png(conf / f"{i}.png")
        assert lab.shape == c.shape == img.shape[:2]
        assert set(np.unique(lab)) <= {0} | {k + 1 for k in keys_of[i]}
        assert set(np.unique(c)) <= {0, 255}
        rec = store.get(i, ("keys", "cam"))
        want, scores = irn_pseudo_label(loaded, img, rec.cam, rec.keys, params, torch.device("cpu"))
        assert np.array_equal(lab, want)
        assert np.array_equal(c == 255, confidence_mask(scores, 0.5))
    assert not read_label_png(out / "im2.png").any()
    # dense walk gives the same labels
    rec = store.get("im1", ("keys", "cam"))
    ls, _ = irn_pseudo_label(loaded, images["im1"], rec.cam, rec.keys, params, torch.device("cpu"))
    ld, _ = irn_pseudo_label(loaded, images["im1"], rec.cam, rec.keys, {**params, "walk": "dense"}, torch.device("cpu"))
    assert np.array_equal(ls, ld)
    (conf / "im0.png").unlink()
    assert make_irn_masks(
        FakeDS(images),
        store,
        list(images),
        model,
        out,
        params,
        conf_dir=conf,
        device=torch.device("cpu"),
        progress=False,
        journal=ShardJournal(tmp_path / "j", {"a": 1}),
    ) == {"written": 1, "skipped": 2}
    assert make_irn_masks(
        FakeDS(images),
        store,
        list(images),
        model,
        out,
        params,
        conf_dir=conf,
        device=torch.device("cpu"),
        progress=False,
    ) == {"written": 3, "skipped": 0}
    with pytest.raises(ValueError, match="not an IRN model"):
        from wsss.engine import save_checkpoint

        save_checkpoint(tmp_path / "other.pt", model={}, method="cam")
        load_irn(tmp_path / "other.pt")


def test_walk_steps_scale_with_the_map_size():
    """walk_size: the walk's 2^exp_times steps hold at that map long side and scale with its square
    (reach ~ radius * sqrt(steps)); null keeps exp_times for every map (IRN)."""
    from wsss.refine.irn_params import IRNInferParams

    p = IRNInferParams.from_mapping({"exp_times": 8, "walk_size": 125})
    assert p.steps_exponent((94, 125)) == 8  # a 500 x 375 VOC image
    assert p.steps_exponent((30, 40)) == 5  # 8 + 2 log2(40 / 125) = 4.71
    assert p.steps_exponent((125, 250)) == 10  # twice the side: four times the steps
    assert p.steps_exponent((2, 3)) == 0  # never negative
    assert IRNInferParams.from_mapping({"exp_times": 8, "walk_size": None}).steps_exponent((30, 40)) == 8
