"""GPP, AEFT, KTSE and PAR: loss terms on hand-made tensors, gradient flow, every ablation switch,
and one real training run per method on the tiny synthetic dataset."""

from __future__ import annotations

import copy
import csv
import functools
import math

import pytest
import torch

from wsss.methods import build_method
from wsss.methods.aeft import (
    AEFTMethod,
    attraction_loss,
    erase_mask,
    foreground_map,
    region_embedding,
    repulsion_loss,
    sample_negatives,
)
from wsss.methods.base import StepContext
from wsss.methods.gpp import GPPHead, GPPMethod, gap_embedding, gated_merge, gpp_logits, max_norm, pyramid_pool
from wsss.methods.ktse import (
    KTSEMethod,
    background_foreground_ce,
    concat_pair,
    global_alignment_loss,
    inter_class_loss,
    ktse_transfer_hinge,
    local_alignment_loss,
    masked_cross_entropy,
    sample_partners,
    two_threshold_pseudo_labels,
)
from wsss.methods.par import dilated_neighbours, par_affinity, par_refine
from wsss.models import build_backbone

# 4 images, 3 classes: 0/1/2 have partners sharing a class, 3 has none; every image has a negative
LABELS = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)


pytestmark = pytest.mark.usefixtures("single_thread")


@functools.lru_cache(maxsize=1)
def _backbone():
    torch.manual_seed(0)
    return build_backbone("resnet18", pretrained="none", freeze_bn=False, trainable_from=None)


def make(name, **options):
    """A method on a fresh copy of one randomly initialised resnet18 (output stride 16)."""
    torch.manual_seed(0)
    m = build_method(name, num_classes=3, backbone=copy.deepcopy(_backbone()), **options)
    m.train()
    return m


def batch(size=32):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(4, 3, size, size, generator=g), "label": LABELS.clone()}


def ctx(epoch=1, step=3):
    return StepContext(step=step, max_step=100, epoch=epoch, max_epoch=40, device=torch.device("cpu"))


def run_step(method, epoch=1, step=3):
    terms = method.losses(batch(), ctx(epoch, step))
    total = sum(terms.values())
    assert torch.isfinite(total), {k: float(v.detach()) for k, v in terms.items()}
    method.zero_grad(set_to_none=True)
    total.backward()
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return terms


# ==============================================================================================
# GPP
# ==============================================================================================


def test_max_norm_hand_values():
    x = torch.tensor([-1.0, 0.0, 2.0, 4.0]).view(1, 1, 1, 4)
    eps = 1e-5
    expect = torch.tensor([0.0, 0.0, (2 - eps) / (4 + eps), (4 - eps) / (4 + eps)])
    assert torch.allclose(max_norm(x).flatten(), expect)


def test_pyramid_pool_hand_values():
    # left half 0, right half 4: the 2x2 pooled map is [[0, 4], [0, 4]]; bilinear 2 -> 4 columns
    # (align_corners=False) samples at -0.25, 0.25, 0.75, 1.25 -> 0, 1, 3, 4
    cam = torch.tensor([0.0, 0.0, 4.0, 4.0]).repeat(4, 1).view(1, 1, 4, 4)
    p2, p4 = pyramid_pool(cam, [2, 4])
    assert torch.allclose(p2[0, 0], torch.tensor([0.0, 1.0, 3.0, 4.0]).repeat(4, 1))
    assert torch.allclose(p4, cam)


def test_gated_merge_zero_weights_is_quarter_sum():
    # sigmoid(0) = 1/2 everywhere: (relu(x)+relu(y))/4 - (relu(-x)+relu(-y))/4 = (x + y)/4
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    zeros = torch.zeros(2, 6, 3, 3)
    assert torch.allclose(gated_merge(x, y, zeros, zeros), (x + y) / 4, atol=1e-6)


def test_gated_merge_hand_weights():
    # one class, x = 2, y = -1. Positive gate: channel 1 = sigmoid(ln3/2 * relu(x)) = 0.75, channel 2 = 0.5;
    # negative gate: channel 1 = 0.5, channel 2 = sigmoid(ln4 * relu(-y)) = 0.8.
    # out = (2*0.75 + 0*0.5)/2 - (0*0.5 + 1*0.8)/2 = 0.35
    x, y = torch.full((1, 1, 3, 3), 2.0), torch.full((1, 1, 3, 3), -1.0)
    wp, wn = torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 3, 3)
    wp[0, 0, 1, 1] = math.log(3) / 2
    wn[1, 1, 1, 1] = math.log(4)
    assert torch.allclose(gated_merge(x, y, wp, wn), torch.full((1, 1, 3, 3), 0.35), atol=1e-6)


def test_gpp_logits_hand_value_and_gradients():
    cam = torch.tensor([[1.0, -2.0], [3.0, -1.0]]).view(1, 1, 2, 2).requires_grad_()
    gpp = torch.tensor([[2.0, 1.0], [-1.0, -3.0]]).view(1, 1, 2, 2).requires_grad_()
    # positive part: relu(cam)relu(gpp) = [2, 0, 0, 0] -> 0.5; negative part: [0, 0, 0, 3] -> 0.75
    out = gpp_logits(cam, gpp)
    assert out.shape == (1, 1) and out.item() == pytest.approx(-0.25)
    out.sum().backward()
    assert torch.allclose(cam.grad.flatten(), torch.tensor([0.5, 0.0, 0.0, 0.75]))
    assert torch.allclose(gpp.grad.flatten(), torch.tensor([0.25, 0.0, 0.0, 0.25]))


def test_gap_embedding_keeps_image_classes():
    x = torch.tensor([[[[2.0, -2.0]]], [[[1.0, 3.0]]]]).expand(2, 2, 1, 2).clone()
    emb = gap_embedding(x, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert torch.allclose(emb, torch.tensor([[1.0, 0.0], [2.0, 2.0]]))


def test_gpp_head_aggregation_orders():
    g = torch.Generator().manual_seed(0)
    cam = torch.randn(2, 3, 8, 8, generator=g)
    gated = GPPHead(16, 3)
    assert gated.bins == [2, 4, 8, 16] and len(gated.gates) == 3
    inverse = GPPHead(16, 3, aggregation="gated_inverse")
    assert inverse.bins == [16, 8, 4, 2] and len(inverse.gates) == 3
    avg = GPPHead(16, 3, aggregation="average")
    assert len(avg.gates) == 0
    assert torch.allclose(avg.aggregate(cam), torch.stack(pyramid_pool(cam, [2, 4, 8, 16])).mean(0))
    single = GPPHead(16, 3, bins=[4])
    assert torch.allclose(single.aggregate(cam), pyramid_pool(cam, [4])[0])
    # the cascade: G3(G2(G1(P2, P4), P8), P16)
    p = pyramid_pool(cam, [2, 4, 8, 16])
    expect = gated.gates[2](gated.gates[1](gated.gates[0](p[0], p[1]), p[2]), p[3])
    assert torch.allclose(gated.aggregate(cam), expect)
    # no bins: plain GAP logits
    gap = GPPHead(16, 3, bins=[])
    feats = torch.randn(2, 16, 8, 8, generator=g)
    out = gap(feats)
    assert out.gpp is None and torch.allclose(out.logits, out.cam.mean(dim=(2, 3)))


def test_gpp_method_forward_backward_and_interface():
    m = make("gpp")
    assert isinstance(m, GPPMethod)
    terms = run_step(m)
    assert set(terms) == {"cls"}
    for gate in m.head.gates:  # the GPP layer is trained through the logits (Eq. 5)
        assert gate.conv_pos.weight.grad is not None and gate.conv_pos.weight.grad.abs().sum() > 0
    assert m.head.fc8.weight.grad.abs().sum() > 0 and m.head.fc9.weight.grad.abs().sum() > 0
    x = batch()["image"]
    cam = m.cam(x)
    assert cam.shape == (4, 3, 2, 2) and (cam >= 0).all()
    assert m.logits(x).shape == (4, 3)
    groups = {g["name"]: g for g in m.param_groups()}
    assert groups["head"]["lr_mult"] == 1.0 and groups["backbone"]["lr_mult"] == 1.0
    assert m.batch_size_for_epoch(30, 16) == 16


@pytest.mark.parametrize(
    "options",
    [
        {"bins": [2]},
        {"bins": [4]},
        {"bins": [8]},
        {"bins": [16]},
        {"aggregation": "average"},
        {"aggregation": "gated_inverse"},
        {"aggregation": "gated"},
        {"bins": []},
    ],
    ids=["2x2", "4x4", "8x8", "16x16", "A", "G_I", "G", "GAP"],
)
def test_gpp_table1_rows_run(options):
    run_step(make("gpp", **options))


@pytest.mark.parametrize("name", ["gpp", "aeft", "ktse"])
def test_unknown_option_is_a_type_error(name):
    with pytest.raises(TypeError, match="no_such_option"):
        make(name, no_such_option=1)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("gpp", {"aggregation": "max"}, "aggregation"),
        ("gpp", {"bins": [2, 2]}, "bins"),
        ("aeft", {"embedding": "feature"}, "embedding"),
        ("aeft", {"bins": []}, "embedding 'gpp'"),
        ("aeft", {"early_batch_size": -1}, "early_batch_size"),
        ("ktse", {"mga_mode": "la"}, "mga_mode"),
        ("ktse", {"concat_axis": "depth"}, "concat_axis"),
        ("ktse", {"pseudo_low": 0.5}, "pseudo_low"),
    ],
)
def test_bad_option_values_are_named(name, options, match):
    with pytest.raises(ValueError, match=match):
        make(name, **options)


# ==============================================================================================
# AEFT
# ==============================================================================================


def _two_class_cam():
    # h = 1, w = 4; class 0: [0, 1, 2, 4] -> max_norm ~ [0, .25, .5, 1]; class 1: [4, 0, 0, 0] -> [1, 0, 0, 0]
    return torch.tensor([[0.0, 1.0, 2.0, 4.0], [4.0, 0.0, 0.0, 0.0]]).view(1, 2, 1, 4)


def test_foreground_map_and_erase_masks_hand_values():
    cam = _two_class_cam()
    only0 = torch.tensor([[1.0, 0.0]])
    both = torch.tensor([[1.0, 1.0]])
    approx = dict(atol=1e-4)
    assert torch.allclose(foreground_map(cam, only0).flatten(), torch.tensor([0.0, 0.25, 0.5, 1.0]), **approx)
    assert torch.allclose(foreground_map(cam, both).flatten(), torch.tensor([1.0, 0.25, 0.5, 1.0]), **approx)
    # Eq. 7 (soft, AEFT): zero above t_H, scaled by A_fg below; hard (KTSE): 0/1
    assert torch.allclose(
        erase_mask(cam, only0, (1, 4), 0.6, "soft").flatten(), torch.tensor([0.0, 0.25, 0.5, 0.0]), **approx
    )
    assert torch.equal(erase_mask(cam, only0, (1, 4), 0.6, "hard").flatten(), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.equal(erase_mask(cam, both, (1, 4), 0.6, "hard").flatten(), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    # upsampling to the image size happens before the normalisation
    assert erase_mask(cam, both, (2, 8), 0.6, "soft").shape == (1, 1, 2, 8)


def test_erase_mask_gradient_soft_flows_hard_stops():
    cam = _two_class_cam().requires_grad_()
    erase_mask(cam, torch.tensor([[1.0, 0.0]]), (1, 4), 0.6, "soft").sum().backward()
    assert cam.grad is not None and cam.grad.abs().sum() > 0  # official: the soft mask is not detached
    cam2 = _two_class_cam().requires_grad_()
    hard = erase_mask(cam2, torch.tensor([[1.0, 0.0]]), (1, 4), 0.6, "hard")
    assert not hard.requires_grad


def test_attraction_loss_hand_values_and_gradients():
    a = torch.tensor([[1.0, 2.0]], requires_grad=True)
    p = torch.tensor([[2.0, 0.0]], requires_grad=True)
    assert attraction_loss(a, p, "l1").item() == pytest.approx(1.5)
    loss = attraction_loss(a, p, "mse")
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    # no stop-gradient: both the anchor and the positive (erased) embedding are trained
    assert torch.allclose(a.grad, torch.tensor([[-1.0, 2.0]])) and torch.allclose(p.grad, torch.tensor([[1.0, -2.0]]))
    with pytest.raises(ValueError, match="distance"):
        attraction_loss(a, p, "cosine")


def test_region_embedding_hand_value():
    feat = torch.tensor([2.0, -4.0, 1.0, 0.0]).view(1, 1, 1, 4)
    region = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    # normalised by max|feat| = 4: [.5, -1, .25, 0]; mean over the region: (.5 + .25) / 2
    out = region_embedding(feat, region, torch.tensor([[1.0]]))
    assert out.item() == pytest.approx(0.375, abs=1e-4)
    assert region_embedding(feat, region, torch.tensor([[0.0]])).item() == 0.0


def test_repulsion_loss_hand_values_hard_triplets_and_gradient():
    anchor = torch.tensor([[0.2, 0.0], [1.0, 0.0]], requires_grad=True)
    negative = torch.tensor([[0.0, 0.1], [0.0, 0.0]])
    # d = [0.05, 1.0]; only the first is hard (d < 0.5): relu(0.5 - 0.05) = 0.45
    loss = repulsion_loss(anchor, negative, margin=0.5, min_hard=1)
    assert loss.item() == pytest.approx(0.45)
    loss.backward()
    # d(relu(0.5 - d))/da = -2 (a - n) on the hard row only
    assert torch.allclose(anchor.grad, torch.tensor([[-0.4, 0.2], [0.0, 0.0]]))
    # the code needs more than 4 hard triplets
    assert repulsion_loss(anchor, negative, margin=0.5, min_hard=5).item() == 0.0
    assert repulsion_loss(anchor, negative, margin=0.5, min_hard=2).item() == 0.0


def test_sample_negatives_disjoint_skip_and_reproducible():
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    idx = sample_negatives(labels, torch.Generator().manual_seed(0))
    assert idx[3] == -1  # shares a class with everyone: no negative, the anchor is skipped
    for i, j in enumerate(idx.tolist()):
        if j >= 0:
            assert j != i and float(labels[i] @ labels[j]) == 0.0
    assert idx[2] == -1 and idx[0] == 1 and idx[1] == 0
    lab = torch.eye(6)
    a = sample_negatives(lab, torch.Generator().manual_seed(5))
    b = sample_negatives(lab, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and (a >= 0).all() and (a != torch.arange(6)).all()
    draws = {tuple(sample_negatives(lab, torch.Generator().manual_seed(s)).tolist()) for s in range(5)}
    assert len(draws) > 1  # random, not always the first disjoint image


def test_aeft_schedule_and_terms_before_T():
    m = make("aeft")
    assert m.batch_size_for_epoch(0, 32) == 8 and m.batch_size_for_epoch(17, 32) == 8
    assert m.batch_size_for_epoch(18, 32) == 32
    assert make("aeft", early_batch_size=0).batch_size_for_epoch(0, 32) == 32
    terms = m.losses(batch(), ctx(epoch=17))
    assert set(terms) == {"cls", "attract", "repel"}
    assert terms["attract"].item() == 0.0 and terms["repel"].item() == 0.0


def test_aeft_classification_on_first_n_only():
    m = make("aeft", cls_first_n=2)
    m.eval()  # no dropout: deterministic
    b1 = batch()
    b2 = copy.deepcopy(b1)
    b2["label"][2:] = 1.0 - b2["label"][2:]
    c1 = m.losses(b1, ctx(epoch=0))["cls"]
    c2 = m.losses(b2, ctx(epoch=0))["cls"]
    assert c1.item() == pytest.approx(c2.item())
    full = make("aeft", cls_first_n=0)
    full.eval()
    assert full.losses(b1, ctx(epoch=0))["cls"].item() != pytest.approx(full.losses(b2, ctx(epoch=0))["cls"].item())


def test_aeft_forward_backward_and_embedding_paths():
    m = make("aeft", triplet_start_epoch=1, min_hard_triplets=1)
    assert isinstance(m, AEFTMethod)
    terms = run_step(m)
    assert set(terms) == {"cls", "attract", "repel"}
    assert terms["attract"].item() > 0
    # Indirect (GPP) embedding: the attraction trains the GPP gates; Direct (CAM) embedding does not
    t = m.losses(batch(), ctx())
    m.zero_grad(set_to_none=True)
    t["attract"].backward()
    assert m.head.gates[2].conv_pos.weight.grad.abs().sum() > 0
    d = make("aeft", triplet_start_epoch=1, embedding="cam")
    t = d.losses(batch(), ctx())
    d.zero_grad(set_to_none=True)
    t["attract"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in d.head.gates.parameters())
    assert d.head.fc9.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "options",
    [
        {"attract": True, "repel": False},  # Table 2 row 1
        {"attract": False, "repel": True},  # Table 2 row 2
        {"embedding": "cam"},  # Table 2 Direct
        {},  # Table 2 Indirect (ours)
        {"attract_mode": "rigid", "repel": False},  # Table 3 Attract (Rigid)
        {"attract": False, "repel": False},  # Table 3 GPP only
        {"repel_anchor": "full"},  # §4.3: e_A instead of e_AL
        {"mask_mode": "hard", "detach_mask": True, "attract_distance": "mse"},
    ],
    ids=["attract", "repel", "direct", "indirect", "rigid", "gpp-only", "repel-full", "hard-mse"],
)
def test_aeft_table_2_3_rows_run(options):
    m = make("aeft", triplet_start_epoch=1, min_hard_triplets=1, **options)
    terms = run_step(m)
    assert ("attract" in terms) == (m.attract and m.attract_mode == "soft")
    assert ("erased_cls" in terms) == (m.attract and m.attract_mode == "rigid")
    assert ("repel" in terms) == m.repel


# ==============================================================================================
# PAR
# ==============================================================================================


def test_dilated_neighbours_offsets():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    n = dilated_neighbours(x, [1, 2])
    assert n.shape == (1, 1, 16, 5, 5)
    # centre pixel (2, 2) = 12; its 8 neighbours at dilation 1, then at dilation 2
    assert n[0, 0, :8, 2, 2].tolist() == [6, 7, 8, 11, 13, 16, 17, 18]
    assert n[0, 0, 8:, 2, 2].tolist() == [0, 2, 4, 10, 14, 20, 22, 24]
    # replicate padding at the corner
    assert n[0, 0, :8, 0, 0].tolist() == [0, 0, 1, 0, 1, 5, 5, 6]


def test_par_affinity_uniform_image_hand_values():
    # uniform image: colour softmax = 1/8; position term for dilation 1: the 4 axis neighbours share
    # the softmax (the diagonal ones are exp(-227) smaller), so a_axis = 1/8 + 0.01/4, a_diag = 1/8
    aff = par_affinity(torch.zeros(1, 3, 6, 6), dilations=[1])
    axis = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    assert torch.allclose(aff[0, 0, axis], torch.full((4, 6, 6), 0.125 + 0.0025))
    assert torch.allclose(aff[0, 0, ~axis], torch.full((4, 6, 6), 0.125))


def test_par_constant_mask_grows_by_one_plus_w2_per_step():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 20, 20, generator=g)
    out = par_refine(img, torch.ones(1, 2, 20, 20))
    assert torch.allclose(out, torch.full_like(out, 1.01**10), atol=1e-5)
    assert torch.equal(par_refine(img, torch.ones(1, 2, 20, 20), num_iter=0), torch.ones(1, 2, 20, 20))


def test_par_respects_colour_edges():
    img = torch.zeros(1, 3, 32, 64)
    img[..., 32:] = 1.0
    mask = torch.zeros(1, 1, 32, 64)
    mask[..., :32] = 1.0
    edge = par_refine(img, mask)
    flat = par_refine(torch.zeros_like(img), mask)
    # two pixels right of the colour edge: the uniform image leaks the mask, the edge blocks it
    assert flat[0, 0, 16, 34] > 0.2
    assert edge[0, 0, 16, 34] < 0.01 * flat[0, 0, 16, 34]


def test_par_affinity_is_invariant_to_per_channel_affine_maps():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 12, 12, generator=g)
    std, mean = (
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
    )
    assert torch.allclose(par_affinity((img - mean) / std), par_affinity(img), atol=1e-5)


# ==============================================================================================
# KTSE
# ==============================================================================================


def test_sample_partners_share_a_class_skip_and_reproducible():
    idx = sample_partners(LABELS, torch.Generator().manual_seed(0))
    assert idx[3] == -1  # class 2 appears only in image 3
    for i, j in enumerate(idx.tolist()):
        if j >= 0:
            assert j != i and float(LABELS[i] @ LABELS[j]) > 0
    assert torch.equal(idx, sample_partners(LABELS, torch.Generator().manual_seed(0)))
    many = torch.tensor([[1.0, 0.0]] * 6)
    draws = {tuple(sample_partners(many, torch.Generator().manual_seed(s)).tolist()) for s in range(5)}
    assert len(draws) > 1


def test_concat_pair_axes():
    a, b = torch.zeros(2, 3, 4, 5), torch.ones(2, 3, 4, 5)
    h = concat_pair(a, b, "height")
    w = concat_pair(a, b, "width")
    assert h.shape == (2, 3, 8, 5) and h[:, :, 4:].eq(1).all() and h[:, :, :4].eq(0).all()
    assert w.shape == (2, 3, 4, 10) and w[..., 5:].eq(1).all()
    assert concat_pair(torch.zeros(2, 4, 5), torch.ones(2, 4, 5), "height").shape == (2, 8, 5)


def test_ktse_transfer_hinge_hand_value_and_bidirectional_gradient():
    target = torch.tensor([[1.0, 0.5], [2.0, 2.0]]).view(1, 2, 1, 2).requires_grad_()
    pair = torch.tensor([[0.9, 0.0], [0.0, 0.0]]).view(1, 2, 1, 2).requires_grad_()
    y = torch.tensor([[1.0, 0.0]])  # class 1 absent: ignored, but counted in the mean
    # class 0: relu(0.1 - 0.05) + relu(0.5 - 0.05) = 0.5; mean over 1 x 2 x 1 x 2 = 0.125
    loss = ktse_transfer_hinge(target, pair, y, margin=0.05)
    assert loss.item() == pytest.approx(0.125)
    loss.backward()
    assert torch.allclose(target.grad.flatten(), torch.tensor([0.25, 0.25, 0.0, 0.0]))
    assert torch.allclose(pair.grad.flatten(), torch.tensor([-0.25, -0.25, 0.0, 0.0]))


def test_local_and_global_alignment_hand_values():
    cam = torch.tensor([1.0, 0.0, 2.0, 0.0]).view(1, 1, 2, 2).requires_grad_()
    cam_m = torch.tensor([1.5, 1.0, 5.0, -1.0]).view(1, 1, 2, 2).requires_grad_()
    region = torch.tensor([1.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2)  # pixel 3 was erased
    y = torch.tensor([[1.0]])
    # relu(cam_m M - cam M - 0.05): [0.45, 0.95, 0, 0] -> mean 0.35
    local = local_alignment_loss(cam_m, cam, region, y, margin=0.05)
    assert local.item() == pytest.approx(0.35)
    # GAP(relu): cam_m [1.5, 1, 5, 0] -> 1.875; cam -> 0.75
    glob = global_alignment_loss(cam_m, cam, y)
    assert glob.item() == pytest.approx(1.125)
    (local + glob).backward()
    assert cam.grad is not None and cam_m.grad is not None  # no stop-gradient on either branch
    assert global_alignment_loss(cam_m, cam, torch.tensor([[0.0]])).item() == 0.0


def test_masked_cross_entropy_hand_values():
    logits = torch.zeros(1, 2, 1, 3, requires_grad=True)
    target = torch.tensor([[[0, 1, 255]]])
    assert masked_cross_entropy(logits, target).item() == pytest.approx(math.log(2))
    empty = masked_cross_entropy(logits, torch.full((1, 1, 3), 255))
    assert empty.item() == 0.0 and not torch.isnan(empty)  # F.cross_entropy would give NaN
    empty.backward()


def test_background_foreground_ce_hand_values():
    # pixel 0 bg (target 0), pixel 1 fg class 1 (target 2), pixel 2 ignored
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [5.0, 5.0, 5.0]]).T.reshape(1, 3, 1, 3)
    pseudo = torch.tensor([[[0, 2, 255]]])
    bg, fg = background_foreground_ce(logits, pseudo)
    assert bg.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)))
    assert fg.item() == pytest.approx(-math.log(math.e / (math.e + 2)))


def test_inter_class_loss_hand_value_and_stop_gradient():
    # pixel 0: [3, 2, 1] inside the mask -> 2 - 3 = -1; pixel 1 outside the mask
    scores = torch.tensor([[3.0, 5.0], [2.0, 1.0], [1.0, 0.0]]).view(1, 3, 1, 2).requires_grad_()
    mask = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    loss = inter_class_loss(scores, mask)
    assert loss.item() == pytest.approx(-1.0 / (1 + 1e-5))
    loss.backward()
    # only the second-largest score gets gradient; the largest is detached
    expect = torch.tensor([[0.0, 0.0], [1.0 / (1 + 1e-5), 0.0], [0.0, 0.0]]).view(1, 3, 1, 2)
    assert torch.allclose(scores.grad, expect)


def _banded_cam():
    # class 1 (present) in three vertical bands of a 16-wide map: 1.0 | 0.2 | 0.05;
    # class 0 is absent and large (must never be chosen)
    row = torch.tensor([1.0] * 6 + [0.2] * 5 + [0.05] * 5)
    cam = torch.stack([torch.full((8, 16), 7.0), row.repeat(8, 1)])[None]
    return cam, torch.tensor([[0.0, 1.0]])


def test_two_threshold_pseudo_labels_hand_case():
    cam, y = _banded_cam()
    image = torch.zeros(1, 3, 8, 16)
    lab = two_threshold_pseudo_labels(cam, y, image, high=0.3, low=0.15, use_par=False)
    assert lab.shape == (1, 8, 16) and lab.dtype == torch.long
    # 1.0 > 0.3: class 1 (id 2); 0.2: below 0.3 but above 0.15 -> ignored; 0.05 below both -> bg
    assert (lab[0, :, :5] == 2).all()
    assert (lab[0, :, 7:10] == 255).all()
    assert (lab[0, :, 13:] == 0).all()
    assert set(lab.unique().tolist()) <= {0, 2, 255}
    # PAR on an image whose colour edges follow the bands keeps the labels of the band interiors ...
    banded = torch.tensor([0.0] * 6 + [0.5] * 5 + [1.0] * 5).repeat(1, 3, 8, 1)
    lab_par = two_threshold_pseudo_labels(cam, y, banded, use_par=True)
    assert (lab_par[0, :, :5] == 2).all() and (lab_par[0, :, 7:10] == 255).all() and (lab_par[0, :, 13:] == 0).all()
    # ... while on a uniform image the propagation blurs across bands: the low-threshold foreground
    # of the middle band spreads into the right band, which becomes uncertain instead of background
    lab_flat = two_threshold_pseudo_labels(cam, y, image, use_par=True, dilations=[1], num_iter=10)
    assert (lab_flat[0, :, 14:] == 255).all()


def test_pseudo_labels_carry_no_gradient():
    cam, y = _banded_cam()
    cam.requires_grad_()
    lab = two_threshold_pseudo_labels(cam, y, torch.rand(1, 3, 8, 16))
    assert not lab.requires_grad and cam.grad is None


def test_ktse_schedule_and_constant_terms():
    m = make("ktse")
    assert isinstance(m, KTSEMethod)
    assert m.batch_size_for_epoch(9, 16) == 8 and m.batch_size_for_epoch(10, 16) == 16
    names = {"cls", "kt", "seg_bg", "seg_fg", "seg_inter", "seg_pair", "global", "local"}
    before = m.losses(batch(), ctx(epoch=9))
    assert set(before) == names and all(v.item() == 0.0 for k, v in before.items() if k != "cls")
    after = m.losses(batch(), ctx(epoch=10))
    assert set(after) == names and after["kt"].item() > 0 and after["seg_bg"].item() > 0


def test_ktse_forward_backward_gradient_paths_and_cam():
    m = make("ktse", start_epoch=1)
    run_step(m)
    assert m.head.fc9.out_channels == 4  # C + 1: background first
    cam = m.cam(batch()["image"])
    assert cam.shape == (4, 3, 2, 2) and (cam >= 0).all()  # foreground maps only
    # the self-supervised CE trains the background channel; the classification loss cannot
    t = m.losses(batch(), ctx())
    m.zero_grad(set_to_none=True)
    t["seg_bg"].backward(retain_graph=True)
    assert m.head.fc9.weight.grad[0].abs().sum() > 0
    m.zero_grad(set_to_none=True)
    t["cls"].backward(retain_graph=True)
    assert m.head.fc9.weight.grad[0].abs().sum() == 0
    m.zero_grad(set_to_none=True)
    t["kt"].backward()
    assert m.head.fc9.weight.grad[1:].abs().sum() > 0


@pytest.mark.parametrize(
    "sie, ssr, mga",
    [
        (False, False, False),
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (True, True, False),
        (True, True, True),
        (True, False, True),
        (False, True, True),
    ],
)
def test_ktse_table6_switches_run(sie, ssr, mga):
    m = make("ktse", start_epoch=1, sie=sie, ssr=ssr, mga=mga)
    terms = run_step(m)
    assert ("kt" in terms) == sie and ("seg_bg" in terms) == ssr and ("global" in terms) == mga
    assert ("seg_pair" in terms) == (sie and ssr)


@pytest.mark.parametrize(
    "mode, terms",
    [("ga", {"global"}), ("ga_la", {"global", "local"}), ("rigid", {"erased_cls"}), ("gpp", {"gpp_attract"})],
)
def test_ktse_table7_rows_run(mode, terms):
    m = make("ktse", start_epoch=1, sie=False, ssr=False, mga_mode=mode)
    assert set(run_step(m)) == {"cls"} | terms


def test_ktse_variants_run():
    m = make(
        "ktse",
        start_epoch=1,
        concat_axis="width",
        use_par=False,
        seg_relu=False,
        kt_detach_target=True,
        num_pairs=0,
        mask_mode="soft",
    )
    terms = run_step(m)
    assert set(terms) == set(m.term_names())


def _capture_forwards(method):
    """Record every forward of ``method`` and keep the gradient of each CAM."""
    seen = []
    original = method.forward_all

    def wrapped(images):
        out = original(images)
        out.cam.retain_grad()
        seen.append(out)
        return out

    method.forward_all = wrapped
    return seen


@pytest.mark.parametrize("detach", [False, True])
def test_ktse_transfer_is_bidirectional_unless_detached(detach):
    m = make("ktse", start_epoch=1, ssr=False, mga=False, num_pairs=1, kt_detach_target=detach)
    seen = _capture_forwards(m)
    t = m.losses(batch(), ctx())
    assert len(seen) == 2  # anchors, then the concatenated pair (anchor 0 + its only partner 2)
    t["kt"].backward()
    single, pair = seen
    assert pair.cam.grad is not None and pair.cam.grad.abs().sum() > 0
    if detach:
        assert single.cam.grad is None
    else:
        g = single.cam.grad.abs().flatten(1).sum(1)
        assert g[0] > 0 and g[2] > 0 and g[1] == 0 and g[3] == 0


# ==============================================================================================
# AEFT's colour jitter in the training transform
# ==============================================================================================


def test_train_transform_colour_jitter():
    import numpy as np

    from wsss.data.transforms import TrainTransform, color_jitter

    img = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    plain = TrainTransform(resize_long=(48, 48), crop_size=32)
    on = TrainTransform(resize_long=(48, 48), crop_size=32, color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=1.0)
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    a = plain(img, rng())
    b = on(img, rng())
    assert a.shape == b.shape == (3, 32, 32) and not np.allclose(a, b)
    assert np.array_equal(b, on(img, rng()))  # a function of the rng only
    # p = 0 never jitters
    assert np.array_equal(color_jitter(img, (0.4, 0.4, 0.4, 0.1), 0.0, np.random.default_rng(0)), img)
    # strengths of zero leave the image unchanged
    assert np.array_equal(color_jitter(img, (0, 0, 0, 0), 1.0, np.random.default_rng(0)), img)
    with pytest.raises(ValueError, match="color_jitter"):
        TrainTransform(color_jitter=(0.4, 0.4, 0.4))
    with pytest.raises(ValueError, match="color_jitter_p"):
        TrainTransform(color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=1.5)


# ==============================================================================================
# the real engine on the tiny synthetic dataset
# ==============================================================================================


def _train(tiny_cfg, tmp_path, name, options):
    from wsss.data import open_dataset
    from wsss.data.base import write_labels_csv
    from wsss.pipeline import train_classifier

    cfg = copy.deepcopy(tiny_cfg)
    ds = open_dataset(cfg)
    ids = ds.ids("train_aug")
    write_labels_csv(tmp_path / "labels.csv", ids, {i: ds.labels(i) for i in ids}, ds.class_names)
    cfg["classifier"]["method"] = name
    cfg["classifier"]["method_options"] = options
    cfg["classifier"]["epochs"] = 2
    out = train_classifier(
        cfg, str(tmp_path / "labels.csv"), str(tmp_path / "m.pt"), str(tmp_path / "w"), progress=False
    )
    assert out.exists()
    with open(tmp_path / "w" / "train_log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return len(ids), cfg["classifier"]["batch_size"], rows


def _check_schedule(rows, n, early, base, term):
    by_epoch = {e: [r for r in rows if int(r["epoch"]) == e] for e in (0, 1)}
    assert len(by_epoch[0]) == n // early and len(by_epoch[1]) == n // base
    assert all(float(r[f"loss_{term}"]) == 0.0 for r in by_epoch[0])
    assert any(float(r[f"loss_{term}"]) != 0.0 for r in by_epoch[1])
    assert all(math.isfinite(float(r["loss_total"])) for r in rows)


def test_gpp_trains_through_the_engine(tiny_cfg, tmp_path):
    n, base, rows = _train(tiny_cfg, tmp_path, "gpp", {})
    assert len(rows) == 2 * (n // base) and all(math.isfinite(float(r["loss_cls"])) for r in rows)


def test_aeft_trains_through_the_engine(tiny_cfg, tmp_path):
    options = {"triplet_start_epoch": 1, "early_batch_size": 6, "min_hard_triplets": 1}
    n, base, rows = _train(tiny_cfg, tmp_path, "aeft", options)
    assert {"loss_cls", "loss_attract", "loss_repel"} <= set(rows[0])
    _check_schedule(rows, n, 6, base, "attract")


def test_ktse_trains_through_the_engine(tiny_cfg, tmp_path):
    n, base, rows = _train(tiny_cfg, tmp_path, "ktse", {"start_epoch": 1, "early_batch_size": 6})
    assert {"loss_kt", "loss_seg_bg", "loss_global", "loss_local"} <= set(rows[0])
    _check_schedule(rows, n, 6, base, "seg_bg")
