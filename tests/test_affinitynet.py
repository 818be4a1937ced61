"""AffinityNet (PSA, Ahn & Kwak 2018): training labels, pair labels, the loss, the network and the
random walk (wsss/refine/affinitynet.py, docs/affinitynet.md). Hand-computed values on small maps;
the sparse walk against the dense reference formula."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch

from wsss.engine import TrainConfig, build_optimizer, train_step
from wsss.methods.base import StepContext
from wsss.refine.affinitynet import (
    EPS,
    IGNORE,
    PRESETS,
    AffinityInferParams,
    AffinityLabelParams,
    AffinityNetMethod,
    AffinityTrainParams,
    AffinityTrainSet,
    affinity_loss_terms,
    affinity_pair_labels,
    affinitynet_pseudo_label,
    dense_affinity_matrix,
    downsample_label,
    downsample_scores,
    pair_affinity,
    psa_cam_scores,
    psa_label,
    psa_pairs,
    psa_training_label,
    random_walk_dense,
    random_walk_sparse,
    transition_stencil,
)

# 4x4 label used by the pair tests (radius 2: directions (0,1), (1,-1), (1,0), (1,1); sources rows
# 0..2, columns 1..2)
LABEL_4x4 = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [0, 255, 1, 1],
        [2, 2, 2, 2],
    ],
    dtype=np.int64,
)


# ------------------------------------------------------------------------------------------------
# training labels
# ------------------------------------------------------------------------------------------------


def test_psa_label_hand():
    la = np.array([[0, 1, 1], [0, 0, 2]])
    ha = np.array([[0, 1, 0], [1, 0, 2]])
    # la foreground kept, la background -> 255, then ha background -> 0
    assert psa_label(la, ha).tolist() == [[0, 1, 0], [255, 0, 2]]
    # no score (255 in either map, or valid False) -> 255
    ha2 = ha.copy()
    ha2[0, 0] = 255
    valid = np.ones((2, 3), bool)
    valid[1, 2] = False
    assert psa_label(la, ha2, valid).tolist() == [[255, 1, 0], [255, 0, 255]]
    with pytest.raises(ValueError, match="shape"):
        psa_label(la, ha[:, :2])


def test_downsample_scores_is_block_mean_with_zero_padding():
    s = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    out = downsample_scores(s, 2)
    assert out.shape == (2, 2, 3)
    # first block of plane 0: (0 + 1 + 5 + 6) / 4; last column block: (4 + 9) / 4 (zero padded)
    assert out[0, 0, 0] == pytest.approx(3.0)
    assert out[0, 0, 2] == pytest.approx((4 + 9) / 4)
    # bottom-right block holds one real cell: 14 / 4
    assert out[0, 1, 2] == pytest.approx(14 / 4)


def test_downsample_label_majority_ties_and_no_score():
    label = np.array(
        [
            [1, 1, 0, 2],
            [1, 0, 2, 0],
            [255, 255, 3, 3],
            [255, 255, 255, 4],
        ]
    )
    out = downsample_label(label, 2)
    # block (0,0): three 1s -> 1; (0,1): 0, 2, 2, 0 -> tie -> the smaller label 0;
    # (1,0): all 255 -> no score; (1,1): 3, 3, 255, 4 -> 3
    assert out.tolist() == [[1, 0], [IGNORE, 3]]


def test_psa_training_label_downsamples_each_map_then_combines():
    la = np.zeros((4, 4), np.uint8)
    la[:2, :2] = 5  # confident foreground in the top-left block
    ha = np.full((4, 4), 5, np.uint8)
    ha[2:, 2:] = 0  # confident background in the bottom-right block
    ha[2:, :2] = 255  # no score (crop padding)
    out = psa_training_label(la, ha, stride=2)
    assert out.tolist() == [[5, 255], [255, 0]]


def test_crf_label_pair_with_fake_crf():
    from wsss.refine.affinitynet import crf_label_pair

    calls = []

    def fake(img, high_res, keys, alpha, **kw):
        calls.append((alpha, kw))
        return None, np.full(high_res.shape[1:], int(alpha), np.uint8)

    img = np.zeros((5, 6, 3), np.uint8)
    la, ha = crf_label_pair(
        img, np.zeros((1, 5, 6), np.float32), [3], {"low_alpha": 2, "high_alpha": 21, "crf": {"t": 3}}, fake
    )
    assert la.max() == 2 and ha.max() == 21 and calls == [(2, {"t": 3}), (21, {"t": 3})]


# ------------------------------------------------------------------------------------------------
# pairs, pair labels and the loss
# ------------------------------------------------------------------------------------------------


def test_pairs_reference_sizes_and_order():
    p = psa_pairs((56, 56), 5)  # the reference's 448 crop at stride 8
    assert p.directions.shape == (34, 2)
    assert p.directions[:4].tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]
    assert p.directions[4].tolist() == [1, -4]  # 1 + 16 < 25; (2, -5) would not be
    assert p.src.size == (56 - 4) * (56 - 8)
    small = psa_pairs((4, 4), 2)
    assert small.directions.tolist() == [[0, 1], [1, -1], [1, 0], [1, 1]]
    assert small.src.tolist() == [1, 2, 5, 6, 9, 10]
    assert small.dst[:, 0].tolist() == [2, 4, 5, 6]
    # a grid too small for any source has no pairs (the reference's empty slices)
    assert psa_pairs((3, 8), 5).num_pairs == 0


def test_pair_labels_hand_counts_4x4():
    p = psa_pairs((4, 4), 2)
    bg, fg, neg = affinity_pair_labels(torch.from_numpy(LABEL_4x4), p)
    assert bg.shape == (4, 6)
    # counted by hand over the 6 sources x 4 directions (24 pairs; 6 have an ignored end)
    assert int(bg.sum()) == 3 and int(fg.sum()) == 7 and int(neg.sum()) == 8
    assert int((bg + fg + neg).max()) == 1  # each pair in at most one set
    # source (0,1) = label 0: (0,2)=1 neg, (1,0)=0 bg, (1,1)=0 bg, (1,2)=1 neg
    assert bg[:, 0].tolist() == [0, 1, 1, 0] and neg[:, 0].tolist() == [1, 0, 0, 1]
    # source (2,1) = 255: no label at all
    assert (bg[:, 4] + fg[:, 4] + neg[:, 4]).sum() == 0
    # batched form
    b = affinity_pair_labels(torch.from_numpy(np.stack([LABEL_4x4, LABEL_4x4])), p)
    assert b[0].shape == (2, 4, 6) and int(b[1].sum()) == 14


def test_pair_labels_6x6_against_brute_force():
    rng = np.random.default_rng(3)
    label = rng.choice([0, 1, 2, 255], size=(6, 6))
    r = 3
    p = psa_pairs((6, 6), r)
    bg, fg, neg = affinity_pair_labels(torch.from_numpy(label), p)
    # brute force: sources y < 6-2, 2 <= x < 6-2; all forward neighbours within the radius
    want = {"bg": 0, "fg": 0, "neg": 0}
    for y in range(0, 4):
        for x in range(2, 4):
            for dy in range(0, r):
                for dx in range(-r + 1, r):
                    if (dy == 0 and dx <= 0) or dy * dy + dx * dx >= r * r:
                        continue
                    a, b = label[y, x], label[y + dy, x + dx]
                    if a == 255 or b == 255:
                        continue
                    key = "neg" if a != b else ("bg" if a == 0 else "fg")
                    want[key] += 1
    assert (int(bg.sum()), int(fg.sum()), int(neg.sum())) == (want["bg"], want["fg"], want["neg"])
    assert p.directions.shape[0] == 12  # 2 + 5 + 5 (dy = 2, dx = ±2: 8 < 9)


def test_pair_affinity_hand():
    f = torch.zeros(1, 2, 3, 3)
    f[0, :, 0, 2] = torch.tensor([1.0, 3.0])  # destination (0,2) of source (0,1) in direction (0,1)
    p = psa_pairs((3, 3), 2)  # sources (0,1), (1,1)
    a = pair_affinity(f, p)
    assert a.shape == (1, 4, 2)
    assert a[0, 0, 0].item() == pytest.approx(math.exp(-(1 + 3) / 2))
    assert a[0, 2, 0].item() == pytest.approx(1.0)  # (0,1) -> (1,1): equal features
    assert a[0, 3, 1].item() == pytest.approx(1.0)


def test_loss_terms_hand_values_4x4():
    p = psa_pairs((4, 4), 2)
    bg, fg, neg = affinity_pair_labels(torch.from_numpy(LABEL_4x4), p)
    aff = 0.9 * bg + 0.8 * fg + 0.3 * neg + 0.5 * (1 - bg - fg - neg)
    t = affinity_loss_terms(aff, bg, fg, neg)
    assert t["bg"].item() == pytest.approx(-math.log(0.9 + EPS) * 3 / (3 + EPS), rel=1e-6)
    assert t["fg"].item() == pytest.approx(-math.log(0.8 + EPS) * 7 / (7 + EPS), rel=1e-6)
    assert t["neg"].item() == pytest.approx(-math.log(1 + EPS - 0.3) * 8 / (8 + EPS), rel=1e-6)
    # no pairs of a kind: that term is 0 (the reference's + 1e-5 in the count)
    empty = affinity_loss_terms(aff, torch.zeros_like(bg), fg, neg)
    assert empty["bg"].item() == 0.0


def test_method_losses_are_the_reference_weights():
    torch.manual_seed(0)
    m = AffinityNetMethod("resnet18", pretrained="none", radius=3)
    x = torch.randn(2, 3, 96, 96)
    label = torch.from_numpy(np.random.default_rng(0).choice([0, 1, 255], size=(2, 12, 12)))
    ctx = StepContext(step=0, max_step=1, epoch=0, max_epoch=1, device=torch.device("cpu"))
    terms = m.losses({"image": x, "label": label}, ctx)
    assert set(terms) == {"bg", "fg", "neg"}
    raw = m.last_components
    assert terms["bg"].item() == pytest.approx(raw["bg"] / 4, rel=1e-6)
    assert terms["fg"].item() == pytest.approx(raw["fg"] / 4, rel=1e-6)
    assert terms["neg"].item() == pytest.approx(raw["neg"] / 2, rel=1e-6)
    with pytest.raises(ValueError, match="feature grid"):
        m.losses({"image": x, "label": label[:, :10]}, ctx)


# ------------------------------------------------------------------------------------------------
# network and one training step
# ------------------------------------------------------------------------------------------------


def test_network_structure_and_groups():
    torch.manual_seed(0)
    m = AffinityNetMethod("resnet18", pretrained="none")
    assert m.taps == ("stage2", "stage3", "stage4") and m.feature_stride == 8 and m.pad_multiple == 16
    assert [c.out_channels for c in m.reduce] == [64, 128, 256] and m.f9.in_channels == 448 == m.f9.out_channels
    assert all(c.bias is None for c in m.head_modules())
    groups = {g["name"]: g for g in m.param_groups()}
    assert groups["head"]["lr_mult"] == 10.0 and groups["backbone"]["lr_mult"] == 1.0
    feat = m(torch.randn(1, 3, 80, 112))
    assert feat.shape == (1, 448, 10, 14)
    with pytest.raises(ValueError, match="unknown tap"):
        AffinityNetMethod("resnet18", taps=("nope",))


def test_one_training_step_finite_named_terms():
    torch.manual_seed(0)
    m = AffinityNetMethod("resnet18", pretrained="none", radius=5)
    opt = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, weight_decay=5e-4))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rng = np.random.default_rng(1)
    label = np.zeros((2, 12, 12), np.int64)
    label[:, 2:8, 3:9] = rng.integers(1, 3)
    label[:, :, 10:] = 255
    before = m.f9.weight.detach().clone()
    ctx = StepContext(step=0, max_step=1, epoch=0, max_epoch=1, device=torch.device("cpu"))
    m.train()
    out = train_step(m, {"image": torch.randn(2, 3, 96, 96), "label": torch.from_numpy(label)}, ctx, opt, scaler, False)
    assert {"loss_bg", "loss_fg", "loss_neg", "loss_total"} == set(out)
    assert all(math.isfinite(v) for v in out.values())
    assert out["loss_total"] == pytest.approx(out["loss_bg"] + out["loss_fg"] + out["loss_neg"], rel=1e-6)
    assert not torch.equal(before, m.f9.weight.detach())


class _FakeDS:
    def __init__(self, images):
        self.images = images

    def load_image(self, image_id):
        return self.images[image_id]


def test_train_set_joint_crop_and_label_grid():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    la = np.zeros((40, 60), np.uint8)
    la[:, 30:] = 4
    ha = np.zeros((40, 60), np.uint8)
    ha[:, 30:] = 4
    ts = AffinityTrainSet(_FakeDS({"a": img}), ["a"], lambda i: (la, ha), crop_size=64, stride=8, color_jitter=None)
    s = ts[0]
    assert s["image"].shape == (3, 64, 64) and s["label"].shape == (8, 8)
    lab = s["label"].numpy()
    assert set(np.unique(lab)) <= {0, 4, 255}
    assert (lab == 255).any()  # the 40-row image in a 64 crop: padded rows have no score
    s2 = ts[0]
    assert torch.equal(s["image"], s2["image"])  # (seed, epoch, index) -> same crop
    with pytest.raises(ValueError, match="multiple"):
        AffinityTrainSet(_FakeDS({}), [], lambda i: None, crop_size=60, stride=8)


# ------------------------------------------------------------------------------------------------
# random walk
# ------------------------------------------------------------------------------------------------


def _random_aff(size, r, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(1, 8, *size, generator=g)
    p = psa_pairs(size, r)
    return pair_affinity(f, p)[0], p


@pytest.mark.parametrize("size,r,logt", [((12, 14), 5, 6), ((9, 13), 5, 8), ((7, 9), 3, 3), ((6, 6), 2, 0)])
def test_sparse_walk_matches_dense_psa_formula(size, r, logt):
    aff, p = _random_aff(size, r, seed=sum(size))
    cam = torch.rand(3, *size, generator=torch.Generator().manual_seed(1))
    # the reference formula, written out: A^beta with identity diagonal, column sums, T^(2^logt)
    a = dense_affinity_matrix(aff.double(), p).pow(8.0)
    t = a / a.sum(0, keepdim=True)
    ref = (cam.double().reshape(3, -1) @ torch.linalg.matrix_power(t, 2**logt)).view(3, *size)
    sparse = random_walk_sparse(cam, aff, p, beta=8.0, logt=logt)
    dense = random_walk_dense(cam, aff, p, beta=8.0, logt=logt)
    assert sparse.dtype == torch.float32
    assert (sparse.double() - ref).abs().max().item() < 1e-4
    assert (dense.double() - ref).abs().max().item() < 1e-4
    assert torch.equal(sparse.argmax(0), ref.float().argmax(0)) or (sparse.double() - ref).abs().max() < 1e-6


def test_stencil_is_column_stochastic_and_symmetric_matrix():
    aff, p = _random_aff((8, 11), 3, seed=5)
    a = dense_affinity_matrix(aff, p)
    assert torch.equal(a, a.T) and torch.all(a.diagonal() == 1)
    offsets, w, self_w = transition_stencil(aff.double(), p, beta=8.0)
    total = self_w + w.sum(0)
    assert torch.allclose(total, torch.ones_like(total))
    assert len(offsets) == 2 * p.directions.shape[0]


def test_psa_cam_scores_background_and_pooling():
    cams = np.zeros((2, 10, 12), np.float32)
    cams[0, :4, :4] = 1.0
    cams[1, 8:, 8:] = 0.5
    s = psa_cam_scores(cams, alpha=2, stride=8)
    assert s.shape == (3, 2, 2)
    # top-left 8x8 block: 16 cells class 0 (bg 0), 48 cells bg 1
    assert s[0, 0, 0] == pytest.approx(48 / 64) and s[1, 0, 0] == pytest.approx(16 / 64)
    # bottom-right block: 2 real rows x 4 real cols; class 1 = 0.5, bg (1-0.5)^2 = 0.25; zero padding
    assert s[2, 1, 1] == pytest.approx(8 * 0.5 / 64) and s[0, 1, 1] == pytest.approx(8 * 0.25 / 64)
    assert psa_cam_scores(np.zeros((0, 8, 8), np.float32), 16).tolist() == [[[1.0]]]


def _random_net_and_image(seed):
    """A randomly initialised ResNet-18 AffinityNet and a random 100 x 130 image."""
    torch.manual_seed(0)
    m = AffinityNetMethod("resnet18", pretrained="none", radius=5)
    return m, np.random.default_rng(seed).integers(0, 256, (100, 130, 3), dtype=np.uint8)


def test_pseudo_label_end_to_end_and_crf_hook():
    m, img = _random_net_and_image(0)
    cams = np.zeros((2, 100, 130), np.float32)
    cams[0, 10:50, 10:60] = 0.9
    cams[1, 60:, 80:] = 0.8
    labels, scores = affinitynet_pseudo_label(
        m, img, cams, [4, 11], {"alpha": 16, "beta": 8, "logt": 2, "walk_size": None}
    )
    assert labels.shape == (100, 130) and scores.shape == (3, 100, 130)
    assert set(np.unique(labels)) <= {0, 5, 12}
    dense_labels, _ = affinitynet_pseudo_label(m, img, cams, [4, 11], {"logt": 2, "walk_size": None, "walk": "dense"})
    assert (dense_labels == labels).mean() > 0.999
    seen = {}

    def fake_crf(canvas, probs, t, **kw):
        seen.update(shape=canvas.shape, pad=canvas[-1, -1].tolist(), t=t, kw=kw, c=probs.shape[0])
        return probs

    affinitynet_pseudo_label(m, img, cams, [4, 11], {"logt": 2, "crf_t": 1}, crf_fn=fake_crf)
    assert seen["shape"] == (112, 144, 3) and seen["pad"] == [123, 116, 103] and seen["t"] == 1 and seen["c"] == 3
    assert seen["kw"] == {"pos_w": 3, "pos_xy_std": 3, "bi_w": 10, "bi_xy_std": 80, "bi_rgb_std": 13}


def test_walk_size_scales_the_steps_with_the_map():
    p = AffinityInferParams.from_mapping({"logt": 8, "walk_size": 63})
    # PSA's 500-pixel VOC image at stride 8 (63 cells) walks 2^8; a quarter of the side, 2^4
    assert p.steps_exponent((47, 63)) == 8 and p.steps_exponent((12, 16)) == 4
    # a 160-pixel synthetic image at stride 8: 8 + 2 log2(20 / 63) = 4.69 -> 2^5; never below 2^0
    assert p.steps_exponent((15, 20)) == 5 and p.steps_exponent((1, 1)) == 0
    assert AffinityInferParams.from_mapping({"logt": 6, "walk_size": None}).steps_exponent((5, 500)) == 6
    with pytest.raises(ValueError, match="walk_size"):
        AffinityInferParams.from_mapping({"walk_size": 0})
    # the pseudo-label walks the scaled number of steps: the 144 x 112 padded image is an 18 x 14
    # grid at stride 8, so walk_size 18 walks exactly 2^logt steps and walk_size 36 four times fewer
    m, img = _random_net_and_image(1)
    cams = np.zeros((1, 100, 130), np.float32)
    cams[0, 20:60, 30:90] = 0.9
    at = {ws: affinitynet_pseudo_label(m, img, cams, [2], {"logt": 4, "walk_size": ws})[1] for ws in (18, 36)}
    fixed = {e: affinitynet_pseudo_label(m, img, cams, [2], {"logt": e, "walk_size": None})[1] for e in (2, 4)}
    np.testing.assert_allclose(at[18], fixed[4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(at[36], fixed[2], rtol=1e-5, atol=1e-6)
    assert np.abs(fixed[4] - fixed[2]).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------


def test_params_defaults_presets_and_validation():
    assert AffinityInferParams().logt == 8 and AffinityTrainParams().radius == 5
    assert AffinityLabelParams().low_alpha == 4.0
    for paper, sections in PRESETS.items():
        AffinityLabelParams.from_mapping(sections["label"])
        AffinityTrainParams.from_mapping(sections["train"])
        AffinityInferParams.from_mapping(sections["infer"])
    assert PRESETS["aeft"]["label"] == {"low_alpha": 2.0, "high_alpha": 21.0}
    assert PRESETS["aeft"]["infer"] == {"alpha": 19.0, "beta": 8.0, "logt": 6, "crf_t": 1, "walk_size": None}
    assert PRESETS["hfpl"]["label"] == {"low_alpha": 1.0, "high_alpha": 24.0}
    assert PRESETS["hfpl"]["infer"]["alpha"] == 6.0 and PRESETS["hfpl"]["infer"]["crf_t"] == 0
    with pytest.raises(ValueError, match="unknown key"):
        AffinityInferParams.from_mapping({"exp_times": 8})
    with pytest.raises(ValueError, match="low_alpha"):
        AffinityLabelParams(low_alpha=30, high_alpha=2)
    with pytest.raises(ValueError, match="walk"):
        AffinityInferParams(walk="fast")
    with pytest.raises(ValueError, match="color_jitter"):
        AffinityTrainParams.from_mapping({"color_jitter": [0.3, 0.3]})


def test_params_defaults_are_the_config_schemas():
    """One source of truth: the parameter classes' defaults are the schema's ``affinitynet``
    defaults (read from it), key for key, and a validated empty config holds exactly them."""
    import dataclasses

    import yaml

    from wsss.config import SCHEMA_PATH, validate_config

    props = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]["affinitynet"]["properties"]
    cfg = validate_config({}, extra_checks=False)["affinitynet"]
    for sub, cls in (("label", AffinityLabelParams), ("train", AffinityTrainParams), ("infer", AffinityInferParams)):
        schema = {k: v["default"] for k, v in props[sub]["properties"].items()}
        lib = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cls()).items()}
        assert lib == schema == cfg[sub], sub
        assert cls.from_mapping(cfg[sub]) == cls()
    # PSA's values (docs/affinitynet.md)
    assert AffinityTrainParams().backbone == "resnet38" and AffinityTrainParams().crop_size == 448
    assert (AffinityLabelParams().high_alpha, AffinityInferParams().alpha, AffinityInferParams().beta) == (
        32.0,
        16.0,
        8.0,
    )
    assert set(cfg) == {"label", "train", "infer", "shards"}


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"affinitynet": {"train": {"epochs": 0}}}, r"'affinitynet.train.epochs'"),
        ({"affinitynet": {"infer": {"exp_times": 8}}}, r"'exp_times' under 'affinitynet.infer'"),
        ({"affinitynet": {"label": {"low_alpha": 40}}}, r"affinitynet.label.*low_alpha"),
        ({"affinitynet": {"label": {"crf": {"gt_prob": 0.7}}}}, r"'gt_prob' under 'affinitynet.label.crf'"),
        ({"affinitynet": {"train": {"backbone": "vgg16"}}}, r"'affinitynet.train.backbone': unknown backbone 'vgg16'"),
        (
            {"affinitynet": {"train": {"backbone": "resnet50", "pretrained": "classifier"}}},
            r"'affinitynet.train.backbone'.*cannot start from",
        ),
        ({"affinitynet": {"train": {"pretrained": "imagnet"}}}, r"'affinitynet.train.pretrained'"),
        (
            {"experiments": {"x": {"affinitynet": {"infer": {"walk": "fast"}}}}},
            r"experiments.x.affinitynet.infer.*walk",
        ),
        ({"deeplab": {"pseudo_masks": "psa"}}, r"'deeplab.pseudo_masks'"),
    ],
)
def test_bad_affinitynet_configs_name_the_key(raw, match):
    from wsss.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_affinitynet_experiment_override_and_run_seed():
    from wsss.config import run_config, validate_config
    from wsss.workflow.stages import stage_params

    cfg = validate_config(
        {
            "seeds": [3],
            "experiments": {
                "aff": {
                    "affinitynet": {"train": {"epochs": 2}, "shards": 4},
                    "deeplab": {"pseudo_masks": "affinitynet"},
                }
            },
        }
    )
    run = run_config(cfg, "aff/s3")
    assert run["affinitynet"]["train"]["epochs"] == 2 and run["affinitynet"]["train"]["seed"] == 3
    assert run["affinitynet"]["train"]["lr"] == 0.1  # merged, not replaced
    assert run["deeplab"]["pseudo_masks"] == "affinitynet"
    assert set(stage_params(run, "affinity_labels")["affinitynet"]) == {"label"}
    assert set(stage_params(run, "affinitynet_train")["affinitynet"]) == {"train"}
    assert set(stage_params(run, "affinitynet_infer")["affinitynet"]) == {"infer"}


# ------------------------------------------------------------------------------------------------
# stage functions: labels -> training -> masks
# ------------------------------------------------------------------------------------------------


def _cam_store(tmp_path, images, keys_of, seed=0):
    from wsss.cams import CamShardWriter, CamStore

    rng = np.random.default_rng(seed)
    path = tmp_path / "cams.h5"
    with CamShardWriter(path, config={"t": 1}, scales=[1.0], normalisation="max") as w:
        for i, img in images.items():
            h, wd = img.shape[:2]
            k = len(keys_of[i])
            hr = np.zeros((k, h, wd), np.float32)
            for j in range(k):  # one bright rectangle per class
                y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, wd // 2))
                hr[j, y : y + h // 2, x : x + wd // 2] = 0.9
            w.add(i, np.asarray(keys_of[i], np.int64), hr[:, ::4, ::4].copy(), hr)
    return CamStore(path)


def test_stages_labels_train_resume_masks(tmp_path):
    from wsss.io import read_label_png
    from wsss.refine.affinitynet import (
        label_pair_paths,
        load_affinitynet,
        make_affinity_labels,
        make_affinitynet_masks,
        train_affinitynet,
    )
    from wsss.workflow.journal import ShardJournal

    rng = np.random.default_rng(0)
    images = {f"im{i}": rng.integers(0, 256, (70, 90, 3), dtype=np.uint8) for i in range(4)}
    keys_of = {"im0": [1], "im1": [0, 6], "im2": [3], "im3": []}
    store = _cam_store(tmp_path, images, keys_of)
    ds = _FakeDS(images)
    labels = tmp_path / "labels"
    res = make_affinity_labels(
        ds,
        store,
        list(images),
        labels,
        {"low_alpha": 2, "high_alpha": 21},
        progress=False,
        journal=ShardJournal(tmp_path / "j", {"a": 1}),
    )
    assert res == {"written": 4, "skipped": 0}
    for i in images:
        la_p, ha_p = label_pair_paths(labels, i)
        la, ha = read_label_png(la_p), read_label_png(ha_p)
        assert la.shape == ha.shape == (70, 90)
        assert set(np.unique(la)) | set(np.unique(ha)) <= {0} | {k + 1 for k in keys_of[i]}
        # a small alpha gives the larger background score: low-alpha foreground within high-alpha foreground
        assert not ((la > 0) & (ha == 0)).any()
    assert not read_label_png(label_pair_paths(labels, "im3")[0]).any()

    params = {"backbone": "resnet18", "crop_size": 96, "batch_size": 2, "epochs": 2, "lr": 0.01, "amp": False}
    cpu = torch.device("cpu")
    ids = list(images)
    tids = ids[1:3]  # two images, one batch: one step per epoch
    full = train_affinitynet(
        ds, tids, labels, tmp_path / "a" / "aff.pt", tmp_path / "a", params, device=cpu, progress=False
    )
    ck = train_affinitynet(
        ds,
        tids,
        labels,
        tmp_path / "b" / "aff.pt",
        tmp_path / "b",
        params,
        device=cpu,
        progress=False,
        stop_after_epochs=1,
    )
    assert ck.name == "last.pt"
    resumed = train_affinitynet(
        ds, tids, labels, tmp_path / "b" / "aff.pt", tmp_path / "b", params, device=cpu, progress=False
    )
    for work in (tmp_path / "a", tmp_path / "b"):  # no weights left behind once the model file is written
        assert not (work / "last.pt").exists() and not (work / "trained.pt").exists(), sorted(work.iterdir())
    sa, sb = load_affinitynet(full, cpu).state_dict(), load_affinitynet(resumed, cpu).state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    import csv

    with open(tmp_path / "a" / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and {"loss_bg", "loss_fg", "loss_neg", "loss_total", "lr_head", "lr_backbone"} <= set(rows[0])
    assert all(math.isfinite(float(r["loss_total"])) for r in rows)
    assert float(rows[0]["lr_head"]) == pytest.approx(10 * float(rows[0]["lr_backbone"]))

    out = tmp_path / "masks"
    infer = {"alpha": 16, "beta": 8, "logt": 3}
    journal = ShardJournal(tmp_path / "jm", {"a": 1})
    assert make_affinitynet_masks(ds, store, ids, full, out, infer, device=cpu, progress=False, journal=journal) == {
        "written": 4,
        "skipped": 0,
    }
    m = load_affinitynet(full, cpu)
    for i, img in images.items():
        lab = read_label_png(out / f"{i}.png")
        assert lab.shape == (70, 90) and set(np.unique(lab)) <= {0} | {k + 1 for k in keys_of[i]}
        rec = store.get(i, ("keys", "high_res"))
        want, _ = affinitynet_pseudo_label(m, img, rec.high_res, rec.keys, infer, cpu)
        assert np.array_equal(lab, want)
    assert not read_label_png(out / "im3.png").any()
    (out / "im0.png").unlink()  # interrupted job: only the lost mask is redone
    assert make_affinitynet_masks(
        ds, store, ids, full, out, infer, device=cpu, progress=False, journal=ShardJournal(tmp_path / "jm", {"a": 1})
    ) == {"written": 1, "skipped": 3}
    with pytest.raises(ValueError, match="batch_size"):
        train_affinitynet(ds, ids[:1], labels, tmp_path / "c.pt", tmp_path / "c", params, progress=False)
    with pytest.raises(ValueError, match="classifier"):
        train_affinitynet(
            ds, tids, labels, tmp_path / "c.pt", tmp_path / "c", {**params, "pretrained": "classifier"}, progress=False
        )
    with pytest.raises(ValueError, match="not an AffinityNet model"):
        from wsss.engine import save_checkpoint

        save_checkpoint(tmp_path / "other.pt", model={}, method="cam")
        load_affinitynet(tmp_path / "other.pt")


def test_resnet38_is_the_reference_network():
    torch.manual_seed(0)
    m = AffinityNetMethod("resnet38", pretrained="none")
    assert m.taps == ("conv4", "conv5", "conv6") and m.feature_stride == 8 and m.pad_multiple == 8
    assert [(c.in_channels, c.out_channels) for c in m.reduce] == [(512, 64), (1024, 128), (4096, 256)]
    # PSA's not_training: conv1a, b2, b2_1, b2_2 frozen, b3 on trains
    assert m.backbone.trainable_from == "b3"
    assert not any(p.requires_grad for p in m.backbone.conv1a.parameters())
    assert any(p.requires_grad for p in m.backbone.b3.parameters())
    with torch.no_grad():
        assert m(torch.randn(1, 3, 40, 48)).shape == (1, 448, 5, 6)


class _SelectDS(_FakeDS):
    """_FakeDS with splits and ground-truth masks (for AEFT's model selection)."""

    num_classes = 8

    def __init__(self, images, masks, splits):
        super().__init__(images)
        self.masks, self.splits = masks, splits

    def ids(self, split):
        return list(self.splits[split])

    def load_mask(self, image_id):
        return self.masks[image_id]


def _selection_setup(tmp_path):
    from wsss.refine.affinitynet import make_affinity_labels

    rng = np.random.default_rng(1)
    images = {f"im{i}": rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for i in range(3)}
    keys_of = {"im0": [1], "im1": [0, 6], "im2": [3]}
    store = _cam_store(tmp_path, images, keys_of, seed=1)
    masks = {i: rng.integers(0, 8, (64, 80)).astype(np.uint8) for i in images}
    ds = _SelectDS(images, masks, {"train": ["im0", "im1"], "sel": ["im1", "im2"]})
    labels = tmp_path / "labels"
    make_affinity_labels(ds, store, list(images), labels, {"low_alpha": 2, "high_alpha": 21}, progress=False)
    return ds, store, labels


def test_aeft_model_selection_keeps_the_best_weights_resumes_and_stays_in_eval_mode(tmp_path, monkeypatch):
    """AEFT's train_aff.py: evaluate at steps from_step, from_step + every, ...; the best weights are
    the model; after the first evaluation the network stays in eval mode (eval_mode_after)."""
    from wsss.refine.affinitynet import ModelSelection, train_affinitynet

    ds, store, labels = _selection_setup(tmp_path)
    scores = {1: 0.2, 2: 0.5, 3: 0.5, 4: 0.1}  # the best is step 2 (step 3 ties: the first is kept)
    seen = {}

    def scripted(self):
        step = len(seen.setdefault(self.log_path.parent, [])) + 1
        seen[self.log_path.parent].append((step, self.method.training, copy.deepcopy(self.method.state_dict())))
        return scores[step]

    monkeypatch.setattr(ModelSelection, "miou", scripted)
    select = {"from_step": 1, "every": 1, "split": "sel", "eval_mode_after": True}
    params = {"backbone": "resnet18", "crop_size": 64, "batch_size": 2, "epochs": 4, "lr": 0.01, "amp": False}
    params["select"] = select
    infer = {"alpha": 16, "beta": 8, "logt": 3}
    cpu = torch.device("cpu")
    kw = dict(device=cpu, progress=False, select_store=store, infer=infer)
    tids = ["im0", "im1"]  # one batch: one step per epoch, 4 steps
    full = train_affinitynet(ds, tids, labels, tmp_path / "a.pt", tmp_path / "a", params, **kw)
    state = torch.load(full, weights_only=False)
    assert state["selection"] == {"step": 2, "miou": 0.5}
    runs = seen[tmp_path / "a"]
    assert [s for s, _, _ in runs] == [1, 2, 3, 4]
    # training mode at the first evaluation only: AEFT never calls model.train() after infer_aff
    assert [t for _, t, _ in runs] == [True, False, False, False]
    for k, v in runs[1][2].items():  # the model file holds the weights of step 2, not the last ones
        torch.testing.assert_close(state["model"][k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(state["model"][k], v) for k, v in runs[3][2].items())
    rows = list(csv.DictReader(open(tmp_path / "a" / "selection.csv")))
    assert [(int(r["step"]), float(r["miou"]), int(r["best_step"])) for r in rows] == [
        (1, 0.2, 1),
        (2, 0.5, 2),
        (3, 0.5, 2),
        (4, 0.1, 2),
    ]
    assert not (tmp_path / "a" / "last.pt").exists()

    # killed after epoch 3 (its evaluation done, best so far step 2): the resumed run gives the same model
    train_affinitynet(ds, tids, labels, tmp_path / "b.pt", tmp_path / "b", params, stop_after_epochs=3, **kw)
    assert len(list(csv.DictReader(open(tmp_path / "b" / "selection.csv")))) == 3
    seen[tmp_path / "b"] = seen[tmp_path / "b"][:3]
    resumed = train_affinitynet(ds, tids, labels, tmp_path / "b.pt", tmp_path / "b", params, **kw)
    assert [t for _, t, _ in seen[tmp_path / "b"]] == [True, False, False, False]  # eval mode survived the resume
    b = torch.load(resumed, weights_only=False)
    assert b["selection"] == {"step": 2, "miou": 0.5}
    for k in state["model"]:
        torch.testing.assert_close(b["model"][k], state["model"][k], rtol=0, atol=0, msg=k)
    assert (tmp_path / "b" / "selection.csv").read_text() == (tmp_path / "a" / "selection.csv").read_text()

    # eval_mode_after false: training mode is restored after each evaluation
    seen.clear()
    scores.update({1: 0.3})
    params2 = {**params, "epochs": 2, "select": {**select, "eval_mode_after": False}}
    train_affinitynet(ds, tids, labels, tmp_path / "c.pt", tmp_path / "c", params2, **kw)
    assert [t for _, t, _ in seen[tmp_path / "c"]] == [True, True]
    assert torch.load(tmp_path / "c.pt", weights_only=False)["selection"] == {"step": 2, "miou": 0.5}


def test_aeft_model_selection_scores_the_walked_masks_and_fails_loudly(tmp_path):
    from wsss.metrics import ConfusionMatrix
    from wsss.refine.affinitynet import affinitynet_pseudo_label, load_affinitynet, train_affinitynet

    ds, store, labels = _selection_setup(tmp_path)
    infer = {"alpha": 16, "beta": 8, "logt": 3}
    cpu = torch.device("cpu")
    params = {"backbone": "resnet18", "crop_size": 64, "batch_size": 2, "epochs": 2, "lr": 0.01, "amp": False}
    params["select"] = {"from_step": 2, "every": 2, "split": "sel"}  # one evaluation, after the last step

    def run(name, p, **kw):
        return train_affinitynet(ds, ["im0", "im1"], labels, tmp_path / f"{name}.pt", tmp_path / name, p, **kw)

    out = run("a", params, device=cpu, progress=False, select_store=store, infer=infer)
    m = load_affinitynet(out, cpu)
    conf = ConfusionMatrix(8)
    for i in ("im1", "im2"):  # the selection split, not the training images
        rec = store.get(i, ("keys", "high_res"))
        conf.update(
            ds.load_mask(i), affinitynet_pseudo_label(m, ds.load_image(i), rec.high_res, rec.keys, infer, cpu)[0]
        )
    sel = torch.load(out, weights_only=False)["selection"]
    assert sel["step"] == 2 and sel["miou"] == pytest.approx(conf.miou)

    late = {**params, "select": {"from_step": 5, "every": 1, "split": "sel"}}  # beyond the 2 updates
    with pytest.raises(ValueError, match="no weights would be evaluated"):
        run("b", late, device=cpu, progress=False, select_store=store, infer=infer)
    with pytest.raises(ValueError, match="select_store"):
        run("b", params, progress=False)
    with pytest.raises(ValueError, match="select.every must be an integer"):
        run("b", {**params, "select": {"from_step": 1, "every": 0, "split": "sel"}}, progress=False)


def test_selection_adds_the_walk_keys_to_the_training_stage():
    from wsss.config import validate_config
    from wsss.workflow.stages import stage_params

    assert "infer" not in stage_params(validate_config({}), "affinitynet_train")["affinitynet"]
    cfg = validate_config({"affinitynet": {"train": {"select": {"from_step": 1600, "every": 200, "split": "train"}}}})
    assert cfg["affinitynet"]["train"]["select"]["eval_mode_after"] is False  # the schema's default
    sp = stage_params(cfg, "affinitynet_train")
    assert sp["affinitynet"]["infer"] == cfg["affinitynet"]["infer"] and stage_params(sp, "affinitynet_train") == sp
    assert PRESETS["aeft"]["train"]["select"] == {
        "from_step": 1600,
        "every": 200,
        "split": "train",
        "eval_mode_after": True,
    }
    assert "select" not in PRESETS["hfpl"]["train"] and "select" not in PRESETS["psa"]["train"]
