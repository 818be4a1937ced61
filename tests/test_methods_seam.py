"""SEAM (Wang et al., CVPR 2020; official code YudeWang/SEAM and HFPL's copy arvijj/hfpl): every loss
term and the PCM on hand-made tensors (formulas written out here, independently of the
implementation), the whole loss assembly against the official training lines written out with
plain tensor operations, gradient routing, the options, CAM inference, ``seam+islfsl`` and one
real training run on the tiny synthetic dataset."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.cam_infer import fused_cams, resolve_upsample
from wsss.methods import build_method, list_methods
from wsss.methods.base import StepContext
from wsss.methods.islfsl import isl_binomial
from wsss.methods.seam import (
    SEAMMethod,
    adaptive_min_pooling_loss,
    background_from_foreground,
    default_pcm_taps,
    ecr_loss,
    er_loss,
    max_onehot,
    pcm_affinity,
    pcm_refine,
    pcm_seed,
    topk_mean,
)
from wsss.models import build_backbone

pytestmark = pytest.mark.usefixtures("single_thread")

CTX = StepContext(step=0, max_step=10, epoch=0, max_epoch=1, device=torch.device("cpu"))
LABELS = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


def _method(name="seam", **options):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", pretrained="none", freeze_bn=True, trainable_from=None)
    return build_method(name, num_classes=3, backbone=backbone, **options)


def _batch(size=48):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(2, 3, size, size, generator=g), "label": LABELS.clone()}


# ==============================================================================================
# pure functions on hand-made tensors
# ==============================================================================================


def test_background_from_foreground():
    maps = torch.tensor([[[[9.0]], [[0.2]], [[0.7]]]])  # 1 x 3 x 1 x 1, channel 0 is replaced
    out = background_from_foreground(maps)
    assert torch.allclose(out.flatten(), torch.tensor([0.3, 0.2, 0.7]))
    assert maps[0, 0, 0, 0] == 9.0  # out of place


def test_max_onehot_keeps_background_and_the_foreground_maximum_with_ties():
    # pixels: (bg 0.5, fg 0.2, 0.6, 0.1), (bg 0.9, fg 0.3, 0.3, 0.0)
    maps = torch.tensor([[0.5, 0.9], [0.2, 0.3], [0.6, 0.3], [0.1, 0.0]])[None, :, None, :]
    expected = torch.tensor([[0.5, 0.9], [0.0, 0.3], [0.6, 0.3], [0.0, 0.0]])[None, :, None, :]
    assert torch.equal(max_onehot(maps), expected)
    assert maps[0, 1, 0, 0] == 0.2


def test_pcm_seed_by_hand():
    # raw CAM 1 x 3 x 1 x 2 (channel 0 = bg, ignored): fg1 = (2, -1), fg2 = (1, 4)
    cam = torch.tensor([[[[5.0, 5.0]], [[2.0, -1.0]], [[1.0, 4.0]]]])
    eps = 1e-5
    fg1 = torch.tensor([(2 - eps) / (2 + eps), 0.0])  # relu(relu(x) - eps) / (max + eps)
    fg2 = torch.tensor([(1 - eps) / (4 + eps), (4 - eps) / (4 + eps)])
    bg = 1 - torch.maximum(fg1, fg2)
    full = pcm_seed(cam, onehot=False)
    assert torch.allclose(full[0, :, 0], torch.stack([bg, fg1, fg2]), atol=1e-7)
    # one-hot: pixel 0's maximum is fg1, pixel 1's is fg2; bg stays
    hot = pcm_seed(cam, onehot=True)
    expected = torch.stack([bg, fg1 * torch.tensor([1.0, 0.0]), fg2 * torch.tensor([0.0, 1.0])])
    assert torch.allclose(hot[0, :, 0], expected, atol=1e-7)
    assert not hot.requires_grad


def test_pcm_affinity_and_refine_by_hand():
    # three pixels with 2-d features: a = (1, 0), b = (1, 1), c = (-1, 0)
    feats = torch.tensor([[1.0, 1.0, -1.0], [0.0, 1.0, 0.0]])[None, :, None, :]
    r = 1 / math.sqrt(2)
    # cosine similarities, ReLU'd (norm + 1e-5 is ~exact here)
    cos = torch.tensor([[1.0, r, 0.0], [r, 1.0, 0.0], [0.0, 0.0, 1.0]])
    aff = cos / cos.sum(dim=0, keepdim=True)  # every column sums to 1
    got = pcm_affinity(feats)
    assert torch.allclose(got[0], aff, atol=1e-4)
    seed = torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 0.0]])[None, :, None, :]  # 2 channels x 3 pixels
    expected = seed[0, :, 0] @ aff  # y_j = sum_i seed_i A_ij
    assert torch.allclose(pcm_refine(seed, feats)[0, :, 0], expected, atol=1e-4)
    # pixel c is orthogonal to/opposite a and b: it keeps its own seed only
    assert torch.allclose(pcm_refine(seed, feats)[0, :, 0, 2], torch.tensor([0.5, 0.0]), atol=1e-4)


def test_adaptive_min_pooling_loss_by_hand():
    # B = 2, C = 2, 2 x 2 maps; k = int(4 * 0.25) = 1 lowest per-pixel maximum per image
    a = torch.tensor([[[0.3, 0.9], [0.5, 0.2]], [[0.1, 0.4], [0.6, 0.8]]])  # per-pixel max: .3 .9 .6 .8 -> .3
    b = torch.tensor([[[-0.5, 0.1], [0.2, 0.3]], [[-0.2, 0.0], [0.1, 0.9]]])  # max: -.2 .1 .2 .9 -> relu(-.2) = 0
    maps = torch.stack([a, b])
    assert torch.isclose(adaptive_min_pooling_loss(maps), torch.tensor((0.3 + 0.0) / (1 * 2)))
    # k = int(4 * 0.5) = 2: (.3 + .6 + 0 + .1) / (2 * 2)
    assert torch.isclose(adaptive_min_pooling_loss(maps, 0.5), torch.tensor((0.3 + 0.6 + 0.0 + 0.1) / 4))


def test_er_loss_by_hand():
    a = torch.tensor([[0.0, 0.0], [0.2, 0.8], [0.4, 0.0]])[None, :, None, :]  # bg, fg1, fg2 over 2 pixels
    b = torch.tensor([[9.0, 9.0], [0.5, 0.8], [0.0, 0.1]])[None, :, None, :]
    fg = (0.3 + 0.0 + 0.4 + 0.1) / 4
    assert torch.isclose(er_loss(a, b), torch.tensor(fg))
    # with the background 1 - max_fg: a bg = (0.6, 0.2), b bg = (0.5, 0.2)
    assert torch.isclose(er_loss(a, b, background=True), torch.tensor((0.1 + 0.0 + 0.3 + 0.0 + 0.4 + 0.1) / 6))


def test_topk_mean_by_hand():
    err = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3], [0.0, 0.0, 0.4, 0.1, 0.2]])
    # k = int(5 * 0.4) = 2 per image: (0.9 + 0.5 + 0.4 + 0.2) / 4
    assert torch.isclose(topk_mean(err, 0.4), torch.tensor(0.5))
    assert torch.isclose(topk_mean(err, 1.0), err.mean())
    assert torch.isclose(topk_mean(err, 0.01), torch.tensor((0.9 + 0.4) / 2))  # k >= 1


def test_ecr_loss_by_hand():
    # target (bg already 1 - max_fg): pixel 0 = (0.2, 0.8, 0.5), pixel 1 = (0.7, 0.1, 0.3)
    target = torch.tensor([[0.2, 0.7], [0.8, 0.1], [0.5, 0.3]], requires_grad=True)[None, :, None, :]
    refined = torch.tensor([[0.1, 0.6], [0.6, 0.0], [0.4, 0.2]])[None, :, None, :]
    onehot = torch.tensor([[0.2, 0.7], [0.8, 0.0], [0.0, 0.3]])  # fg non-maxima zeroed
    err = (onehot - refined[0, :, 0]).abs().flatten()  # .1 .1 .2 0 .4 .1
    k = int(6 * 0.5)
    expected = err.sort(descending=True).values[:k].mean()
    got = ecr_loss(target, refined, fraction=0.5)
    assert torch.isclose(got, expected)
    assert not got.requires_grad  # the target is detached, the refined map has no graph here
    plain = ecr_loss(target, refined, fraction=1.0, onehot=False, detach=False)
    assert torch.isclose(plain, (target - refined).abs().mean())
    assert plain.requires_grad


def test_default_pcm_taps():
    assert default_pcm_taps(build_backbone("resnet38", pretrained="none")) == ("conv4", "conv5")
    assert default_pcm_taps(build_backbone("resnet18", pretrained="none")) == ("stage2", "stage3")
    m = _method()
    assert m.f8_3.in_channels == 128 and m.f8_4.in_channels == 256  # resnet18 stage2/stage3
    assert m.f9.in_channels == 64 + 128 + 3 and m.f9.out_channels == 192 and m.fc8.out_channels == 4


# ==============================================================================================
# the method
# ==============================================================================================


def _official_losses(m: SEAMMethod, x1: torch.Tensor, y: torch.Tensor) -> dict:
    """The loss lines of train_SEAM.py / HFPL train_cam_voc.py (no ISL/FSL), written out with plain
    tensor operations on the network outputs (raw CAM and PCM output, upsampled to the input)."""

    def up(t, size):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=True)

    def mnorm(p):
        p = F.relu(p)
        mx = p.amax(dim=(2, 3), keepdim=True)
        mn = p.amin(dim=(2, 3), keepdim=True)
        return F.relu(p - mn - 1e-5) / (mx - mn + 1e-5)

    def amp(x):
        n, _, h, w = x.shape
        k = h * w // 4
        v = torch.topk(x.max(dim=1).values.reshape(n, -1), k, largest=False).values
        return F.relu(v).sum() / (k * n)

    x2 = F.interpolate(x1, scale_factor=0.3, mode="bilinear", align_corners=True)
    lab = torch.cat([torch.ones(len(y), 1), y], 1)[:, :, None, None]
    o1, o2 = m.forward_maps(x1), m.forward_maps(x2)
    cam1, rv1 = up(o1["score"], x1.shape[-2:]), up(o1["refined"], x1.shape[-2:])
    cam2, rv2 = up(o2["score"], x2.shape[-2:]), up(o2["refined"], x2.shape[-2:])
    cls1 = F.multilabel_soft_margin_loss(cam1.mean((2, 3))[:, 1:], y)
    cls2 = F.multilabel_soft_margin_loss(cam2.mean((2, 3))[:, 1:], y)
    rvmin = (amp((rv1 * lab)[:, 1:]) + amp((rv2 * lab)[:, 1:])) / 2
    cam1 = F.interpolate(mnorm(cam1), scale_factor=0.3, mode="bilinear", align_corners=True) * lab
    rv1 = F.interpolate(mnorm(rv1), scale_factor=0.3, mode="bilinear", align_corners=True) * lab
    cam2, rv2 = mnorm(cam2) * lab, mnorm(rv2) * lab
    er = (cam1[:, 1:] - cam2[:, 1:]).abs().mean()
    cam1, cam2 = cam1.clone(), cam2.clone()
    cam1[:, 0] = 1 - cam1[:, 1:].max(dim=1).values
    cam2[:, 0] = 1 - cam2[:, 1:].max(dim=1).values

    def onehot(x):
        x = x.detach().clone()
        mx = x[:, 1:].max(dim=1, keepdim=True).values
        x[:, 1:][x[:, 1:] != mx] = 0
        return x

    n, c, hs, ws = cam2.shape
    k = int(c * hs * ws * 0.2)
    ecr = sum(torch.topk((onehot(t) - r).abs().reshape(n, -1), k).values.mean() for t, r in ((cam2, rv1), (cam1, rv2)))
    return {"cls1": cls1 / 2, "cls2": cls2 / 2, "rvmin": rvmin, "er": er, "ecr": ecr}


def test_losses_equal_the_official_training_lines():
    m = _method().eval()  # no dropout: both sides see the same maps
    batch = _batch(size=96)  # the 0.3 view: 28 x 28
    with torch.no_grad():
        ours = m.losses(batch, CTX)
        ref = _official_losses(m, batch["image"], batch["label"])
    assert set(ours) == {"cls1", "cls2", "rvmin", "er", "ecr"}
    for key in ref:
        assert torch.isclose(ours[key], ref[key], rtol=1e-5, atol=1e-7), (key, ours[key], ref[key])


def test_training_step_terms_finite_and_gradient_routing():
    m = _method().train()
    terms = m.losses(_batch(), CTX)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values()), terms
    # ECR and rvmin reach the PCM convolutions but not the backbone nor fc8 (detached taps and seed)
    m.zero_grad(set_to_none=True)
    (terms["ecr"] + terms["rvmin"]).backward(retain_graph=True)
    assert m.f9.weight.grad is not None and m.f9.weight.grad.abs().sum() > 0
    assert m.fc8.weight.grad is None
    assert all(p.grad is None for p in m.backbone.parameters())
    # classification and ER train fc8 and the backbone, not the PCM
    m.zero_grad(set_to_none=True)
    (terms["cls1"] + terms["cls2"] + terms["er"]).backward()
    assert m.fc8.weight.grad.abs().sum() > 0 and m.f9.weight.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())
    # fc8's background channel never receives a gradient (the background is 1 - max_fg everywhere)
    assert m.fc8.weight.grad[0].abs().sum() == 0


def test_pcm_detach_false_trains_the_backbone_through_the_pcm():
    m = _method(pcm_detach=False).train()
    terms = m.losses(_batch(), CTX)
    terms["ecr"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())


def test_switches_change_the_terms():
    batch = _batch(size=96)
    base = _method().eval()
    with torch.no_grad():
        ref = base.losses(batch, CTX)
    assert "rvmin" not in _method(rvmin=False).eval().losses(batch, CTX)
    for options, common, changed in [
        ({"ecr_topk": 1.0}, {}, "ecr"),
        ({"ecr_onehot": False}, {"ecr_topk": 1.0}, "ecr"),
        ({"er_background": True}, {}, "er"),
        ({"pcm_onehot": False}, {"ecr_topk": 1.0}, "ecr"),
        ({"scale_factor": 0.5}, {}, "er"),
    ]:
        with torch.no_grad():
            a = _method(**common).eval().losses(batch, CTX)[changed]
            b = _method(**common, **options).eval().losses(batch, CTX)[changed]
        assert not torch.isclose(a, b), options
    weighted = _method(cls_weight=2.0, er_weight=3.0, ecr_weight=0.5, rvmin_weight=4.0).eval()
    with torch.no_grad():
        terms = weighted.losses(batch, CTX)
    for key, w in (("cls1", 2.0), ("cls2", 2.0), ("er", 3.0), ("ecr", 0.5), ("rvmin", 4.0)):
        assert torch.isclose(terms[key], w * ref[key], rtol=1e-5), key


@pytest.mark.parametrize(
    "options",
    [
        {"scale_factor": 1.0},
        {"head_dropout": 1.0},
        {"inference": "both"},
        {"ecr_topk": 0.0},
        {"rvmin_fraction": 1.5},
        {"pcm_taps": ["stage2"]},
        {"pcm_taps": ["stage2", "nope"]},
        {"pcm_channels": [64]},
    ],
)
def test_invalid_options(options):
    with pytest.raises(ValueError):
        _method(**options)


def test_unknown_option_raises():
    with pytest.raises(TypeError):
        _method(no_such_option=1)


def test_param_groups_head_lr():
    m = _method()
    groups = {g["name"]: g for g in m.param_groups()}
    assert groups["head"]["lr_mult"] == 10.0 and groups["backbone"]["lr_mult"] == 1.0
    head = {id(p) for p in groups["head"]["params"]}
    assert head == {id(p) for mod in (m.fc8, m.f8_3, m.f8_4, m.f9) for p in mod.parameters()}


# ==============================================================================================
# inference
# ==============================================================================================


def test_inference_maps():
    m = _method().eval()
    x = _batch(size=40)["image"]
    with torch.no_grad():
        out = m.forward_maps(x)
        cam, raw, logits = m.cam(x), m.raw_cam(x), m.logits(x)
    side = math.ceil(40 / m.output_stride)
    assert cam.shape == (2, 3, side, side) and torch.allclose(cam, F.relu(out["refined"][:, 1:]))
    up = F.interpolate(out["refined"][:, 1:], size=(40, 40), mode="bilinear", align_corners=True)
    assert raw.shape == (2, 3, 40, 40) and torch.allclose(raw, up)
    assert (raw >= 0).all()  # the refined CAM is non-negative: raw_then_relu's ReLU changes nothing
    full = F.interpolate(out["score"], size=(40, 40), mode="bilinear", align_corners=True)
    assert torch.allclose(logits, full.mean((2, 3))[:, 1:], atol=1e-6)
    assert resolve_upsample(m) == "raw_then_relu"
    plain = _method(inference="cam").eval()
    with torch.no_grad():
        assert torch.allclose(plain.cam(x), F.relu(plain.forward_maps(x)["score"][:, 1:]))


def test_fused_cams_follow_the_official_inference():
    """infer_SEAM.py: refined CAM per view -> image size (align_corners=False), flip undone, summed,
    min-max normalised (the code leaves its minimum pixels slightly negative; here they are 0)."""
    m = _method().eval()
    x = _batch(size=40)["image"][0]
    views = [torch.stack([x, x.flip(-1)])]
    keys = np.array([0, 2])
    low, high = fused_cams(m, views, (37, 45), keys, "minmax", torch.device("cpu"), "auto")
    with torch.no_grad():
        maps = m.raw_cam(views[0])[:, keys]
        maps = F.interpolate(maps, size=(37, 45), mode="bilinear", align_corners=False)
        s = maps[0] + maps[1].flip(-1)
        mn, mx = s.amin((1, 2), keepdim=True), s.amax((1, 2), keepdim=True)
        expected = F.relu(s - mn - 1e-5) / (mx - mn + 1e-5)
    assert high.shape == (2, 37, 45) and np.allclose(high, expected.numpy(), atol=1e-6)
    assert low.shape == (2, 10, 12)


# ==============================================================================================
# registry and seam+islfsl
# ==============================================================================================


def test_registry_lists_seam_and_seam_islfsl():
    names = list_methods()
    assert "seam" in names and "seam+islfsl" in names


def test_seam_islfsl_builds_steps_and_weights_isl_as_hfpl():
    """HFPL train_cam_voc.py: L_cls1' = (1 - l) L_cls1 + l L_isl enters as (L_cls1' + L_cls2) / 2, so
    the ISL term is 0.5 * l * L_isl; FSL is added with weight 1."""
    m = _method("seam+islfsl").eval()
    base = _method("seam").eval()
    batch = _batch()
    with torch.no_grad():
        torch.manual_seed(5)
        terms = m.losses(batch, CTX)
        ref = base.losses(batch, CTX)
        torch.manual_seed(5)
        cams = base.features_and_cams(batch["image"])["cams"]
        isl = isl_binomial(cams, batch["label"], 10)
    assert set(terms) == {"cls1", "cls2", "rvmin", "er", "ecr", "isl", "fsl"}
    assert torch.isclose(terms["cls1"], 0.8 * ref["cls1"])
    for key in ("cls2", "rvmin", "er", "ecr"):
        assert torch.isclose(terms[key], ref[key]), key
    assert torch.isclose(terms["isl"], 0.5 * 0.2 * isl)
    assert torch.isfinite(terms["fsl"])

    from wsss.engine import TrainConfig, build_optimizer, train_step

    m.train()
    optimizer = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    before = m.base.fc8.weight.detach().clone()
    logged = train_step(m, batch, CTX, optimizer, scaler, use_amp=False)
    assert all(math.isfinite(v) for v in logged.values()) and {"loss_isl", "loss_fsl"} <= set(logged)
    assert not torch.equal(before, m.base.fc8.weight)


def test_seam_on_resnet38_steps():
    torch.manual_seed(0)
    m = build_method("seam", num_classes=3, backbone=build_backbone("resnet38", pretrained="none"))
    assert m.pcm_taps == ("conv4", "conv5") and m.f8_3.in_channels == 512 and m.f8_4.in_channels == 1024
    terms = m.losses(_batch(size=40), CTX)
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert m.f9.weight.grad.abs().sum() > 0


def test_seam_trains_through_the_engine(tiny_cfg, tmp_path):
    from wsss.data import open_dataset
    from wsss.data.base import write_labels_csv
    from wsss.pipeline import train_classifier

    cfg = copy.deepcopy(tiny_cfg)
    ds = open_dataset(cfg)
    ids = ds.ids("train_aug")
    write_labels_csv(tmp_path / "labels.csv", ids, {i: ds.labels(i) for i in ids}, ds.class_names)
    cfg["classifier"]["method"] = "seam+islfsl"
    cfg["classifier"]["epochs"] = 1
    out = train_classifier(
        cfg, str(tmp_path / "labels.csv"), str(tmp_path / "m.pt"), str(tmp_path / "w"), progress=False
    )
    assert out.exists()
    with open(tmp_path / "w" / "train_log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {"loss_cls1", "loss_er", "loss_ecr", "loss_isl", "loss_fsl"} <= set(rows[0])
    assert all(math.isfinite(float(r["loss_total"])) for r in rows)
