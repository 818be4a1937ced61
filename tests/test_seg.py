"""Segmentation stage (wsss.seg): networks, loss, training pairs, inference, evaluation, stages, DDP."""

from __future__ import annotations

import csv
import os
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from wsss.config import ConfigError, load_config_file, section_defaults, validate_section
from wsss.data.base import SegDataset
from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wsss.engine import rank_steps_per_epoch
from wsss.io import read_label_png, write_label_png
from wsss.metrics import BoundaryAccumulator, ConfusionMatrix
from wsss.seg import predict_shard, train_segmentation
from wsss.seg.data import SegTrainSet, SegTrainTransform, apply_confidence, read_confidence_png, resized_crop_box
from wsss.seg.evaluate import (
    InferenceSettings,
    beco_crf_image,
    evaluate_predictions,
    predict_label,
    predict_probs,
    predict_to_dir,
)
from wsss.seg.models import SEG_MODELS, build_seg_model
from wsss.seg.train import SegmentationMethod, segmentation_ce

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------
# a tiny dataset in a temporary folder
# ----------------------------------------------------------------------------------------------


class FolderDataset(SegDataset):
    def __init__(self, root: Path, ids, num_classes: int = 3):
        self.root = Path(root)
        self.class_names = ["background"] + [f"c{i}" for i in range(1, num_classes)]
        self._ids = list(ids)

    def splits(self):
        return ["all"]

    def ids(self, split):
        if split != "all":
            raise KeyError(split)
        return list(self._ids)

    def image_path(self, image_id):
        return self.root / "img" / f"{image_id}.png"

    def mask_path(self, image_id):
        return self.root / "gt" / f"{image_id}.png"


def make_dataset(root: Path, images: dict, masks: dict, num_classes: int = 3) -> FolderDataset:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, img in images.items():
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        write_label_png(root / "gt" / f"{i}.png", masks[i])
    return FolderDataset(root, list(images), num_classes)


def random_dataset(root: Path, n: int = 4, h: int = 24, w: int = 32, seed: int = 0) -> FolderDataset:
    rng = np.random.default_rng(seed)
    images, masks = {}, {}
    for k in range(n):
        m = np.zeros((h, w), np.uint8)
        m[h // 4 : 3 * h // 4, w // 4 : w // 2] = 1 + k % 2
        m[0, :] = 255
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[m == 1] = (200, 30, 30)
        img[m == 2] = (30, 200, 30)
        images[f"im{k}"], masks[f"im{k}"] = img, m
    return make_dataset(root, images, masks)


# ----------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,backbone", [("deeplabv2", "resnet18_os8"), ("deeplabv3plus", "resnet18"), ("deeplabv3plus", "resnet18_os8")]
)
def test_models_forward_backward_odd_size(name, backbone):
    torch.manual_seed(0)
    model = build_seg_model(name, 4, backbone=backbone)
    model.train()
    x = torch.randn(1, 3, 65, 65)
    out = model(x)
    assert set(out) == {"out"}
    assert out["out"].shape == (1, 4, 65, 65)
    out["out"].square().mean().backward()
    head_ids = {id(p) for m in model.head_modules() for p in m.parameters()}
    for n, p in model.named_parameters():
        assert p.requires_grad, n  # everything trains, BN included (BECO)
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if id(p) not in head_ids)


def test_deeplabv2_head_is_summed_aspp():
    torch.manual_seed(0)
    model = build_seg_model("deeplabv2", 3, backbone="resnet18_os8").eval()
    assert [c.dilation[0] for c in model.head.branches] == [6, 12, 18, 24]
    assert [c.padding[0] for c in model.head.branches] == [6, 12, 18, 24]
    assert all(c.bias is not None and float(c.bias.detach().abs().sum()) == 0 for c in model.head.branches)
    std = torch.cat([c.weight.detach().flatten() for c in model.head.branches]).std()
    assert 0.008 < float(std) < 0.012  # N(0, 0.01) init
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        feats = model.backbone(x)
        expected = sum(c(feats) for c in model.head.branches)
        assert torch.allclose(model.pre_logits(x), expected, atol=1e-6)
    assert model.pre_logits(x).shape[-2:] == (5, 6)  # output stride 8


def test_model_options_and_errors():
    assert SEG_MODELS.names() == ["deeplabv1", "deeplabv2", "deeplabv3plus"]
    assert build_seg_model("deeplabv3plus", 3, backbone="resnet18").rates == (6, 12, 18)
    assert build_seg_model("deeplabv3plus", 3, backbone="resnet18_os8").rates == (12, 24, 36)
    with pytest.raises(ValueError, match="output-stride-8"):
        build_seg_model("deeplabv2", 3, backbone="resnet18")
    with pytest.raises(KeyError, match="deeplabv2"):
        build_seg_model("pspnet", 3)
    with pytest.raises(TypeError, match="not_an_option"):
        build_seg_model("deeplabv2", 3, backbone="resnet18_os8", not_an_option=1)
    m = build_seg_model("deeplabv2", 3, backbone="resnet18_os8", freeze_bn=True).train()
    bns = [x for x in m.backbone.modules() if isinstance(x, nn.BatchNorm2d)]
    assert all(not b.training and not b.weight.requires_grad for b in bns)


def test_param_groups_head_multiplier():
    method = SegmentationMethod(build_seg_model("deeplabv3plus", 3, backbone="resnet18"), head_lr_mult=10.0)
    groups = {g["name"]: g for g in method.param_groups()}
    assert groups["head"]["lr_mult"] == 10.0 and groups["backbone"]["lr_mult"] == 1.0
    ids_b = {id(p) for p in groups["backbone"]["params"]}
    ids_h = {id(p) for p in groups["head"]["params"]}
    assert not ids_b & ids_h
    assert ids_b | ids_h == {id(p) for p in method.parameters()}
    assert ids_b == {id(p) for p in method.model.backbone.parameters()}
    assert method.output_stride == 16


# ----------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------


def test_loss_ignores_255_and_normalisations():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[0, :2] = 255
    valid = target != 255
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(segmentation_ce(logits, target, normalisation="valid"), ref)
    assert torch.allclose(segmentation_ce(logits, target, normalisation="all"), ref * valid.sum() / valid.numel())
    changed = logits.clone()
    changed[0, :, :2] = 100 * torch.randn(4, 2, 6, generator=g)  # only ignored pixels change
    for mode in ("valid", "all"):
        assert torch.allclose(
            segmentation_ce(changed, target, normalisation=mode), segmentation_ce(logits, target, normalisation=mode)
        )
    none = torch.full_like(target, 255)
    assert float(segmentation_ce(logits, none, normalisation="valid")) == 0.0
    with pytest.raises(ValueError, match="ce_normalisation"):
        segmentation_ce(logits, target, normalisation="sum")


def test_method_losses_named_ce():
    torch.manual_seed(0)
    method = SegmentationMethod(build_seg_model("deeplabv2", 3, backbone="resnet18_os8"), ce_normalisation="valid")
    batch = {"image": torch.randn(2, 3, 33, 33), "mask": torch.randint(0, 3, (2, 33, 33))}
    terms = method.losses(batch, ctx=None)
    assert list(terms) == ["ce"] and torch.isfinite(terms["ce"])


# ----------------------------------------------------------------------------------------------
# training pairs
# ----------------------------------------------------------------------------------------------


def _identity_transform(h, w):
    assert h == w
    return SegTrainTransform(augment="scale_crop", crop_size=h, scale_range=(1.0, 1.0), hflip=False)


def test_confidence_masks_become_ignore(tmp_path):
    ds = random_dataset(tmp_path / "ds", n=2, h=16, w=16)
    pseudo = np.full((16, 16), 2, np.uint8)
    pseudo[:, :4] = 0
    conf = np.zeros((16, 16, 3), np.uint8)
    conf[4:, :] = 255  # top 4 rows unconfident; RGB, as torchvision save_image writes it
    for i in ds.ids("all"):
        write_label_png(tmp_path / "pm" / f"{i}.png", pseudo)
        (tmp_path / "conf").mkdir(exist_ok=True)
        Image.fromarray(conf).save(tmp_path / "conf" / f"{i}.png")
    assert read_confidence_png(tmp_path / "conf" / "im0.png").sum() == 12 * 16
    Image.fromarray(conf[..., 0] > 0).save(tmp_path / "one_bit.png")  # mode "1"
    assert np.array_equal(read_confidence_png(tmp_path / "one_bit.png"), conf[..., 0] > 0)

    with_conf = SegTrainSet(
        ds, ds.ids("all"), _identity_transform(16, 16), mask_dir=tmp_path / "pm", conf_dir=tmp_path / "conf"
    )
    without = SegTrainSet(ds, ds.ids("all"), _identity_transform(16, 16), mask_dir=tmp_path / "pm")
    expected = pseudo.copy()
    expected[:4] = 255
    assert np.array_equal(with_conf.load_target("im0", (16, 16)), expected)
    item = with_conf[0]
    assert item["mask"].dtype == torch.int64 and np.array_equal(item["mask"].numpy(), expected)
    assert np.array_equal(without[0]["mask"].numpy(), pseudo)
    # the image went through unchanged apart from normalisation
    img = ds.load_image("im0").astype(np.float32) / 255
    x = (img - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    assert np.allclose(item["image"].numpy(), x.transpose(2, 0, 1), atol=1e-5)
    assert np.array_equal(apply_confidence(np.array([[1, 2]], np.uint8), np.array([[True, False]])), [[1, 255]])

    bad = tmp_path / "conf_bad"
    bad.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad / "im0.png")
    with pytest.raises(Exception, match="conf_bad/im0.png"):
        SegTrainSet(ds, ["im0"], _identity_transform(16, 16), mask_dir=tmp_path / "pm", conf_dir=bad)[0]


def test_gt_switch_and_errors(tmp_path):
    ds = random_dataset(tmp_path / "ds", n=2, h=16, w=16)
    gt_set = SegTrainSet(ds, ds.ids("all"), _identity_transform(16, 16), gt=True)
    assert np.array_equal(gt_set[1]["mask"].numpy(), ds.load_mask("im1"))
    with pytest.raises(ValueError, match="gt=True"):
        SegTrainSet(ds, ds.ids("all"), _identity_transform(16, 16), mask_dir=tmp_path, gt=True)
    with pytest.raises(ValueError, match="mask_dir"):
        SegTrainSet(ds, ds.ids("all"), _identity_transform(16, 16))
    (tmp_path / "pm").mkdir()
    write_label_png(tmp_path / "pm" / "im0.png", np.full((16, 16), 7, np.uint8))
    with pytest.raises(Exception, match="class index 7"):
        SegTrainSet(ds, ["im0"], _identity_transform(16, 16), mask_dir=tmp_path / "pm")[0]
    with pytest.raises(Exception, match="pm/im1.png"):
        SegTrainSet(ds, ["im1"], _identity_transform(16, 16), mask_dir=tmp_path / "pm")[0]


@pytest.mark.parametrize("augment,scale_range", [("resized_crop", (0.5, 0.75)), ("scale_crop", (0.5, 1.5))])
def test_augmentation_reproducible_and_label_safe(tmp_path, augment, scale_range):
    ds = random_dataset(tmp_path / "ds", n=2, h=24, w=32)
    t = SegTrainTransform(augment=augment, crop_size=20, scale_range=scale_range)
    s = SegTrainSet(ds, ds.ids("all"), t, gt=True, seed=5)
    a, b = s[0], s[0]
    assert a["image"].shape == (3, 20, 20) and a["mask"].shape == (20, 20)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert set(np.unique(a["mask"].numpy())) <= {0, 1, 2, 255}  # nearest resize keeps label values
    outs = []
    for epoch in range(4):
        s.set_epoch(epoch)
        outs.append(s[0]["image"])
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_resized_crop_box_ranges_and_fallback():
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, ch, cw = resized_crop_box(100, 80, (0.5, 0.75), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + ch <= 100 and 0 <= left and left + cw <= 80
        assert 0.45 * 8000 <= ch * cw <= 0.8 * 8000
    # a 2x100 image cannot hold a square of half its area: centre crop clamped to the ratio range
    assert resized_crop_box(2, 100, (0.5, 0.5), (1.0, 1.0), rng) == (0, 49, 2, 2)


# ----------------------------------------------------------------------------------------------
# inference and evaluation
# ----------------------------------------------------------------------------------------------


class DecodeModel(nn.Module):
    """Predicts the class written into the red channel (R = 40 * class + 20): a fixed prediction."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        r = (x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        cls = torch.round((r - 20) / 40).long().clamp(0, self.num_classes - 1)
        return {"out": 10.0 * F.one_hot(cls, self.num_classes).permute(0, 3, 1, 2).float()}


def _encode(pred: np.ndarray) -> np.ndarray:
    img = np.zeros(pred.shape + (3,), np.uint8)
    img[..., 0] = 40 * pred + 20
    img[..., 1] = np.arange(pred.shape[1])[None] * 7 % 256
    return img


def fixed_dataset(root: Path):
    gt_a = np.array([[0, 0, 1, 1], [0, 0, 1, 255]], np.uint8)
    pred_a = np.array([[0, 1, 1, 1], [0, 0, 2, 2]], np.uint8)
    gt_b = np.zeros((2, 4), np.uint8)
    pred_b = np.array([[0, 0, 0, 0], [0, 0, 0, 1]], np.uint8)
    ds = make_dataset(root, {"a": _encode(pred_a), "b": _encode(pred_b)}, {"a": gt_a, "b": gt_b})
    return ds, {"a": (gt_a, pred_a), "b": (gt_b, pred_b)}


def test_evaluation_of_fixed_prediction(tmp_path):
    ds, pairs = fixed_dataset(tmp_path / "ds")
    settings = InferenceSettings(scales=(1.0,), flip=True)
    counts = predict_to_dir(
        DecodeModel(), ds, ["a", "b"], tmp_path / "pred", settings, device=torch.device("cpu"), progress=False
    )
    assert counts == {"written": 2, "skipped": 0}
    for i, (_, pred) in pairs.items():
        assert np.array_equal(read_label_png(tmp_path / "pred" / f"{i}.png"), pred)
        with Image.open(tmp_path / "pred" / f"{i}.png") as im:
            assert im.mode == "P"  # coloured (VOC palette) and index-preserving
    row = evaluate_predictions(
        ds,
        ["a", "b"],
        tmp_path / "pred",
        tmp_path / "m.csv",
        tmp_path / "pc.csv",
        resolved_config={"deeplab": {"x": 1}},
        split="all",
        gallery_png=tmp_path / "g.png",
        gallery_images=2,
        progress=False,
    )
    # by hand, a: class 0 gt 4 pred 3 tp 3; class 1 gt 3 pred 3 tp 2; class 2 gt 0 pred 1 (the other 2 is void)
    # b: class 0 gt 8 pred 7 tp 7; class 1 pred 1
    iou0 = (3 + 7) / ((4 + 8) + (3 + 7) - (3 + 7))
    iou1 = 2 / (3 + (3 + 1) - 2)
    iou2 = 0.0
    df = pd.read_csv(tmp_path / "m.csv")
    assert len(df) == 1
    assert df["miou"][0] == pytest.approx((iou0 + iou1 + iou2) / 3)
    assert df["iou.c1"][0] == pytest.approx(iou1)
    cm = ConfusionMatrix(3)
    ba = BoundaryAccumulator(3)
    for gt, pred in pairs.values():
        cm.update(gt, pred)
        ba.update(gt, pred)
    assert row["miou"] == pytest.approx(cm.miou)
    assert row["JF"] == pytest.approx(ba.summary()["JF"])
    assert df["mean_precision"][0] == pytest.approx(cm.mean_precision)
    assert df["config_hash"][0] and df["package_version"][0]
    pc = pd.read_csv(tmp_path / "pc.csv")
    assert list(pc["class"]) == ds.class_names
    assert np.allclose(pc["iou"], cm.iou(), equal_nan=True)
    assert np.allclose(pc["recall"], cm.recall(), equal_nan=True)
    assert np.allclose(pc["J"], ba.class_j(), equal_nan=True)
    assert (tmp_path / "g.png").exists()
    os.remove(tmp_path / "pred" / "b.png")
    with pytest.raises(Exception, match="b.png"):
        evaluate_predictions(
            ds,
            ["a", "b"],
            tmp_path / "pred",
            tmp_path / "m.csv",
            tmp_path / "pc.csv",
            resolved_config={},
            progress=False,
        )


class ConstModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.logit = nn.Parameter(torch.tensor([0.3, -1.0, 2.0]))

    def forward(self, x):
        b, _, h, w = x.shape
        return {"out": self.logit[None, :, None, None].expand(b, 3, h, w)}


class PointwiseModel(nn.Module):
    """Logits = fixed 1x1 conv of the image: flip-equivariant, not flip-invariant."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(3, 3, 1, 1, generator=g))

    def forward(self, x):
        return {"out": self.conv(x)}


@pytest.mark.parametrize("fusion", ["mean", "max", "logit_mean"])
def test_multiscale_flip_of_constant_model_equals_single_scale(fusion):
    img = np.random.default_rng(0).integers(0, 255, (21, 30, 3), dtype=np.uint8)
    single = predict_probs(ConstModel(), img, InferenceSettings(scales=(1.0,), fusion=fusion))
    multi = predict_probs(ConstModel(), img, InferenceSettings(scales=(0.5, 1.0, 1.5), flip=True, fusion=fusion))
    assert single.shape == (3, 21, 30)
    assert np.allclose(single, multi, atol=1e-6)
    assert np.allclose(single[:, 0, 0], torch.softmax(torch.tensor([0.3, -1.0, 2.0]), 0).numpy(), atol=1e-6)


class ScaleModel(torch.nn.Module):
    """Logits that depend on the input size: [s, -s, 0] with s = input height / 10."""

    def forward(self, x):
        s = x.shape[-2] / 10.0
        out = torch.tensor([s, -s, 0.0]).view(1, 3, 1, 1).expand(x.shape[0], 3, *x.shape[-2:])
        return {"out": out}


def test_the_three_fusions_on_hand_computed_views():
    img = np.zeros((20, 10, 3), np.uint8)
    scales = (0.5, 1.0, 1.5)  # heights 10, 20, 30: logits s = 1, 2, 3 for class 0, -s for class 1, 0 for class 2
    views = [torch.tensor([s, -s, 0.0]) for s in (1.0, 2.0, 3.0)]
    want = {
        "mean": sum(torch.softmax(v, 0) for v in views) / 3,
        "max": torch.softmax(torch.stack(views).max(0).values, 0),
        "logit_mean": torch.softmax(sum(views) / 3, 0),
    }
    got = {f: predict_probs(ScaleModel(), img, InferenceSettings(scales=scales, fusion=f))[:, 5, 5] for f in want}
    for f in want:
        assert np.allclose(got[f], want[f].numpy(), atol=1e-6), f
    assert not np.allclose(got["mean"], got["logit_mean"], atol=1e-3)  # the fusions really differ


def test_flip_views_are_flipped_back_and_test_size():
    img = np.random.default_rng(1).integers(0, 255, (17, 26, 3), dtype=np.uint8)
    m = PointwiseModel()
    a = predict_probs(m, img, InferenceSettings(flip=False))
    b = predict_probs(m, img, InferenceSettings(flip=True))
    assert np.allclose(a, b, atol=1e-5)
    c = predict_probs(m, img, InferenceSettings(test_size=(32, 32)))
    assert c.shape == (3, 17, 26) and np.allclose(c.sum(0), 1, atol=1e-5)


def test_crf_hook_and_parity_image(monkeypatch):
    seen = {}

    def fake_crf(img, probs, **kw):
        seen["img"], seen["kw"] = img, kw
        out = np.zeros_like(probs)
        out[2] = 1.0
        return out

    monkeypatch.setitem(sys.modules, "wsss.refine.crf", types.SimpleNamespace(deeplab_crf=fake_crf))
    img = np.zeros((5, 6, 3), np.uint8)
    img[0, 0] = (255, 130, 100)
    lab = predict_label(ConstModel(), img, InferenceSettings(crf=True, crf_params={"t": 3}, crf_image="parity"))
    assert (lab == 2).all() and seen["kw"] == {"t": 3}
    # uint8(RGB - (122.675, 116.669, 104.008)): truncated, negatives wrapped mod 256
    assert tuple(seen["img"][0, 0]) == (132, 13, 252)
    assert tuple(seen["img"][1, 1]) == (256 - 122, 256 - 116, 256 - 104)
    assert np.array_equal(beco_crf_image(img), seen["img"])
    predict_label(ConstModel(), img, InferenceSettings(crf=True))
    assert seen["img"] is img
    assert (predict_label(ConstModel(), img, InferenceSettings(crf=False)) == 2).all()  # logit 2.0 is the largest


def test_real_deeplab_crf_runs():
    crf = pytest.importorskip("wsss.refine.crf")
    assert hasattr(crf, "deeplab_crf")
    img = np.zeros((12, 16, 3), np.uint8)
    img[:, 8:] = 200
    m = PointwiseModel()
    for mode in ("raw", "parity"):
        lab = predict_label(m, img, InferenceSettings(crf=True, crf_params={"t": 2}, crf_image=mode))
        assert lab.shape == (12, 16) and lab.dtype == np.uint8 and lab.max() < 3


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------

TINY = {
    "backbone": "resnet18_os8",
    "epochs": 1,
    "batch_size": 2,
    "crop_size": 24,
    "amp": False,
    "test_scales": [1.0],
    "flip": False,
}


def test_params_defaults_beco_and_errors():
    """Defaults come from the schema; the BECO recipe is configs/deeplab_beco.yaml (every key)."""
    assert section_defaults("deeplab")["model"] == "deeplabv2"
    assert validate_section("deeplab", None) == section_defaults("deeplab")
    beco = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "deeplab_beco.yaml")["deeplab"]
    assert (beco["backbone"], beco["lr"], beco["batch_size"], beco["epochs"], beco["crop_size"]) == (
        "resnet101_os8",
        0.01,
        16,
        100,
        512,
    )
    assert beco["test_scales"] == [0.75, 1.0, 1.25] and beco["fusion"] == "max" and beco["head_lr_mult"] == 1.0
    from wsss.seg.train import seg_train_config

    assert seg_train_config(beco).optimizer == "sgd" and seg_train_config(beco).momentum_mode == "standard"
    assert seg_train_config({**beco, "optimizer": "adamw"}).optimizer == "adamw"
    assert (beco["pretrained"], beco["use_confidence"], beco["seed"], beco["crf"], beco["crf_image"]) == (
        "imagenet_v2",
        True,
        3223,
        True,
        "parity",
    )
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "deeplab_beco.yaml").read_text())["deeplab"]
    assert set(raw) == set(section_defaults("deeplab"))  # the recipe names every key
    with pytest.raises(ConfigError, match="deeplab.fusion"):
        validate_section("deeplab", {"fusion": "median"})
    with pytest.raises(ConfigError, match="deeplab.pseudo_masks"):
        validate_section("deeplab", {"pseudo_masks": "cams"})
    with pytest.raises(ConfigError, match="deeplab.scale_range"):
        validate_section("deeplab", {"scale_range": [0.5, 1.5]})


def test_train_predict_shard_resumable(tmp_path, caplog):
    ds = random_dataset(tmp_path / "ds", n=4)
    ids = ds.ids("all")
    pm = tmp_path / "pm"
    for i in ids:
        write_label_png(pm / f"{i}.png", ds.load_mask(i))
    params = dict(TINY, pseudo_masks="irn")
    model = tmp_path / "model.pt"
    train_segmentation(
        ds,
        ids,
        pm,
        None,
        params,
        model,
        tmp_path / "work",
        threads=1,
        resolved_config={"deeplab": params},
        progress=False,
    )
    rows = list(csv.DictReader(open(tmp_path / "work" / "train_log.csv")))
    assert len(rows) == 2 and "loss_ce" in rows[0] and "lr_head" in rows[0]
    assert float(rows[0]["lr_head"]) == pytest.approx(0.01)  # head_lr_mult 1 (BECO)

    from wsss.workflow.journal import ShardJournal

    def journal():  # the same job each time: an interrupted attempt resumes from it
        return ShardJournal(tmp_path / "s0.journal", {"job": 0})

    out = tmp_path / "pred"
    r0 = predict_shard(
        ds,
        ids,
        model,
        params,
        out,
        shard_index=0,
        num_shards=2,
        marker_path=tmp_path / "s0.json",
        progress=False,
        journal=journal(),
    )
    assert r0["written"] == 2 and sorted(p.stem for p in out.glob("*.png")) == ids[:2]
    assert (tmp_path / "s0.json").exists()
    # resumable: PNGs this job wrote are kept (not recomputed); nothing to do -> the model is not even read
    write_label_png(out / f"{ids[0]}.png", np.full((24, 32), 2, np.uint8))
    r0b = predict_shard(
        ds, ids, tmp_path / "missing.pt", params, out, shard_index=0, num_shards=2, progress=False, journal=journal()
    )
    assert (r0b["written"], r0b["skipped"]) == (0, 2)
    assert (read_label_png(out / f"{ids[0]}.png") == 2).all()
    os.remove(out / f"{ids[1]}.png")
    r0c = predict_shard(ds, ids, model, params, out, shard_index=0, num_shards=2, progress=False, journal=journal())
    assert (r0c["written"], r0c["skipped"]) == (1, 1)
    # the job finished: a forced rerun rewrites every PNG (the planted one included)
    journal().finish()
    r0d = predict_shard(ds, ids, model, params, out, shard_index=0, num_shards=2, progress=False, journal=journal())
    assert (r0d["written"], r0d["skipped"]) == (2, 0)
    assert not (read_label_png(out / f"{ids[0]}.png") == 2).all()
    r1 = predict_shard(ds, ids, model, params, out, shard_index=1, num_shards=2, progress=False)
    assert r1["written"] == 2 and len(list(out.glob("*.png"))) == 4
    row = evaluate_predictions(
        ds, ids, out, tmp_path / "m.csv", tmp_path / "pc.csv", resolved_config={"deeplab": params}, progress=False
    )
    assert 0.0 <= row["miou"] <= 1.0

    # ground-truth switch through the stage: no pseudo-mask folder allowed, trains on ds masks
    gt_params = dict(params, pseudo_masks="gt")
    with pytest.raises(ValueError, match="pseudo_masks is 'gt'"):
        train_segmentation(ds, ids, pm, None, gt_params, tmp_path / "gt.pt", tmp_path / "gtwork", progress=False)
    with pytest.raises(ValueError, match="confidence"):
        train_segmentation(
            ds, ids, pm, None, dict(params, use_confidence=True), tmp_path / "c.pt", tmp_path / "cw", progress=False
        )


def test_train_on_ground_truth(tmp_path):
    ds = random_dataset(tmp_path / "ds", n=2)
    params = dict(TINY, pseudo_masks="gt", model="deeplabv3plus", backbone="resnet18")
    train_segmentation(ds, ds.ids("all"), None, None, params, tmp_path / "gt.pt", tmp_path / "w", progress=False)
    state = torch.load(tmp_path / "gt.pt", weights_only=True)
    assert state["method"] == "deeplab" and any(k.startswith("model.decoder") for k in state["model"])


# ----------------------------------------------------------------------------------------------
# DDP (gloo, 2 CPU processes)
# ----------------------------------------------------------------------------------------------


def test_rank_steps_per_epoch():
    assert rank_steps_per_epoch(10, 4, True, 1) == 2
    assert rank_steps_per_epoch(10, 4, True, 2) == 2  # 5 samples per rank, 2 per step
    assert rank_steps_per_epoch(9, 4, True, 2) == 2
    assert rank_steps_per_epoch(10, 4, False, 2) == 3
    with pytest.raises(ValueError, match="divisible"):
        rank_steps_per_epoch(10, 3, True, 2)


class _TensorSet(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 3, 12, 12, generator=g)
        self.y = torch.randint(0, 3, (8, 12, 12), generator=g)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"image": self.x[i], "mask": self.y[i], "index": i}


class _TinySeg(nn.Module):
    """A stand-in for a DeepLab network (conv-BN-conv) so the 2-process run stays fast."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.backbone.output_stride = 1
        self.head = nn.Conv2d(8, 3, 1)
        self.num_classes = 3

    def head_modules(self):
        return [self.head]

    def forward(self, x):
        return {"out": self.head(self.backbone(x))}


def _ddp_worker(rank, world, port, work):
    from wsss.engine import TrainConfig, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    method = SegmentationMethod(_TinySeg())
    init = [p.detach().clone() for p in method.parameters()]
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.1, momentum_mode="standard", amp=False, seed=0)
    train(
        method,
        _TensorSet(),
        cfg,
        Path(work) / "model.pt",
        Path(work) / "w",
        resolved_config={"t": 1},
        device=torch.device("cpu"),
        progress=False,
        distributed=True,
    )
    flat = torch.cat([p.detach().flatten() for p in method.parameters()])
    torch.save(
        {"flat": flat, "changed": any(not torch.equal(a, b) for a, b in zip(init, method.parameters()))},
        Path(work) / f"rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["changed"] and torch.allclose(r0["flat"], r1["flat"])  # synchronised updates
    rows = list(csv.DictReader(open(tmp_path / "w" / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [0, 1]  # 8 images: 4 per rank, total batch 4 = 2 per rank -> 2 steps
    assert not (tmp_path / "w" / "last.pt").exists()  # deleted by rank 0 once model.pt is written
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    params = [v.flatten() for k, v in state["model"].items() if "running" not in k and "num_batches" not in k]
    assert torch.allclose(torch.cat(params), r0["flat"])


def test_hsv_jitter_opencv_conversions_and_seam_shift():
    from wsss.data.transforms import hsv_jitter, hsv_to_rgb_u8, rgb_to_hsv_u8

    # hand-computed OpenCV 8-bit values: red, green, blue, white, black, a grey, a dark orange
    rgb = np.array(
        [[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [128, 128, 128], [200, 100, 0]]]
    )
    hsv = rgb_to_hsv_u8(rgb.astype(np.uint8))
    assert hsv[0].tolist() == [
        [0, 255, 255],
        [60, 255, 255],
        [120, 255, 255],
        [0, 0, 255],
        [0, 0, 0],
        [0, 0, 128],
        [15, 255, 200],
    ]
    assert hsv_to_rgb_u8(hsv)[0, :6].tolist() == rgb[0, :6].tolist()  # the pure colours and greys round-trip
    # the jitter: one (dh, ds, dv) per image from [-r, r], hue modulo 180, S and V clipped
    img = np.full((4, 5, 3), (200, 100, 0), np.uint8)
    out = hsv_jitter(img, (10, 10, 10), np.random.default_rng(3))
    draws = np.random.default_rng(3)
    dh, ds, dv = (int(draws.integers(-r, r + 1)) for r in (10, 10, 10))
    want = hsv_to_rgb_u8(np.array([[[(15 + dh) % 180, min(255 + ds, 255), 200 + dv]]], np.uint8))
    assert (out == want).all() and (dh, ds, dv) != (0, 0, 0)
    assert (hsv_jitter(img, (0, 0, 0), np.random.default_rng(0)) == hsv_to_rgb_u8(rgb_to_hsv_u8(img))).all()


def test_seg_transform_hsv_jitter_switch():
    img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    lab = np.zeros((40, 50), np.uint8)
    plain = SegTrainTransform(augment="scale_crop", crop_size=32, scale_range=(1.0, 1.0), hflip=False)
    jit = SegTrainTransform(
        augment="scale_crop", crop_size=32, scale_range=(1.0, 1.0), hflip=False, hsv_jitter=(10, 10, 10)
    )
    a, _ = plain(img, lab, np.random.default_rng(1))
    b, _ = jit(img, lab, np.random.default_rng(1))
    assert a.shape == b.shape and not np.allclose(a, b)
    with pytest.raises(ValueError, match="hsv_jitter"):
        SegTrainTransform(hsv_jitter=(10, -1, 10))


def test_seam_param_groups_convs_only_biases_doubled_bn_fixed():
    """SEAM's deeplabv1 get_parameter_groups + train_final_voc.py: conv weights x1 (head x10), conv
    biases x2 (head x20) without weight decay; BatchNorm affine parameters are not optimised."""
    from wsss.engine import TrainConfig, build_optimizer
    from wsss.seg.train import SegmentationMethod

    torch.manual_seed(0)
    model = build_seg_model("deeplabv1", num_classes=3, backbone="resnet18_os8")
    m = SegmentationMethod(model, head_lr_mult=10.0, param_groups="seam")
    groups = {g["name"]: g for g in m.param_groups()}
    assert {k: g["lr_mult"] for k, g in groups.items()} == {"backbone": 1.0, "head": 10.0, "head_bias": 20.0}
    assert groups["head_bias"]["weight_decay"] == 0.0 and "weight_decay" not in groups["head"]
    convs = [mod for mod in model.modules() if isinstance(mod, torch.nn.Conv2d)]
    bns = [mod for mod in model.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    grouped = {id(p) for g in groups.values() for p in g["params"]}
    assert grouped == {id(p) for c in convs for p in c.parameters()}  # every conv parameter, nothing else
    assert bns and not any(id(p) in grouped for b in bns for p in b.parameters())
    assert model.head[3].bias is not None and id(model.head[3].bias) in {id(p) for p in groups["head_bias"]["params"]}
    opt = build_optimizer(m.param_groups(), TrainConfig(lr=0.001, weight_decay=5e-4))
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert lrs["head_bias"] == (pytest.approx(0.02), 0.0) and lrs["backbone"] == (pytest.approx(0.001), 5e-4)
    # one step moves no BatchNorm affine parameter, but the layers still normalise with batch statistics
    before = [b.weight.detach().clone() for b in bns]
    m.train()
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32))}
    opt.zero_grad()
    sum(m.losses(batch, None).values()).backward()
    opt.step()
    assert all(torch.equal(b.weight, w) for b, w in zip(bns, before)) and bns[0].training
    standard = SegmentationMethod(model, head_lr_mult=10.0).param_groups()
    assert {g["name"] for g in standard} == {"backbone", "head"}
    with pytest.raises(ValueError, match="param_groups"):
        SegmentationMethod(model, param_groups="caffe")


def test_msc_training_terms_are_deeplab_pytorchs():
    """deeplab-pytorch MSC: CE of the 100 %, 50 %, 75 % logits and of their max, labels resized nearest."""
    from wsss.seg.train import SegmentationMethod, nearest_resize_labels, segmentation_ce

    torch.manual_seed(0)
    model = build_seg_model("deeplabv2", num_classes=3, backbone="resnet18_os8").eval()
    m = SegmentationMethod(model, ce_normalisation="valid", train_scales=(0.5, 0.75))
    x = torch.randn(1, 3, 64, 64)
    mask = torch.randint(0, 3, (1, 64, 64))
    mask[0, :5] = 255
    terms = m.losses({"image": x, "mask": mask}, None)
    assert list(terms) == ["ce", "ce_scale50", "ce_scale75", "ce_max"]
    full = model.pre_logits(x)
    half = model.pre_logits(F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False))
    three = model.pre_logits(F.interpolate(x, scale_factor=0.75, mode="bilinear", align_corners=False))
    assert full.shape[-1] == 8 and half.shape[-1] == 4 and three.shape[-1] == 6
    up = lambda t: F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)  # noqa: E731

    def pil_nearest(lab, n, m=None):  # deeplab-pytorch resize_labels: PIL NEAREST on the float label
        img = Image.fromarray(lab[0].numpy().astype(np.float32)).resize((m or n, n), Image.NEAREST)
        return torch.from_numpy(np.array(img)).long()[None]

    rng = np.random.default_rng(0)
    for shape in [(64, 64, 6, 6), (321, 321, 41, 41), (100, 37, 13, 9), (50, 70, 70, 90)]:
        lab = torch.from_numpy(rng.integers(0, 21, (1, *shape[:2])))
        assert torch.equal(nearest_resize_labels(lab, shape[2:]), pil_nearest(lab, *shape[2:])), shape

    want = {
        "ce": segmentation_ce(full, pil_nearest(mask, 8), 255, "valid"),
        "ce_scale50": segmentation_ce(half, pil_nearest(mask, 4), 255, "valid"),
        "ce_scale75": segmentation_ce(three, pil_nearest(mask, 6), 255, "valid"),
        "ce_max": segmentation_ce(
            torch.stack([full, up(half), up(three)]).max(0).values, pil_nearest(mask, 8), 255, "valid"
        ),
    }
    for k in want:
        torch.testing.assert_close(terms[k], want[k], msg=k)
    assert list(SegmentationMethod(model).losses({"image": x, "mask": mask}, None)) == ["ce"]
    with pytest.raises(ValueError, match="train_scales"):
        SegmentationMethod(model, train_scales=(0.0,))


def test_views_are_resized_with_the_networks_align_corners():
    """SEAM's eval_final_voc.py resizes each view's logits with align_corners=True, as its DeepLab-v1
    upsamples; BECO and deeplab-pytorch use False. predict_probs follows the network."""
    from wsss.seg.train import SegmentationMethod

    class Ramp(torch.nn.Module):  # logits: a horizontal ramp on a 2 x 3 grid, whatever the input size
        align_corners = False

        def forward(self, x):
            r = torch.tensor([[0.0, 1.0, 2.0]]).expand(2, 3)
            return {"out": torch.stack([r, -r, torch.zeros(2, 3)])[None].expand(x.shape[0], 3, 2, 3)}

    img = np.zeros((4, 6, 3), np.uint8)
    got = {}
    for ac in (False, True):
        m = Ramp()
        m.align_corners = ac
        got[ac] = predict_probs(m, img, InferenceSettings(scales=(1.0,), fusion="logit_mean"))
        ramp = F.interpolate(torch.tensor([[[[0.0, 1.0, 2.0]] * 2]]), size=(4, 6), mode="bilinear", align_corners=ac)[
            0, 0
        ]
        want = torch.softmax(torch.stack([ramp, -ramp, torch.zeros_like(ramp)]), 0).numpy()
        assert np.allclose(got[ac], want, atol=1e-6), ac
    assert not np.allclose(got[False], got[True])
    v1 = SegmentationMethod(build_seg_model("deeplabv1", num_classes=3, backbone="resnet18_os8"))
    v2 = SegmentationMethod(build_seg_model("deeplabv2", num_classes=3, backbone="resnet18_os8"))
    assert v1.align_corners is True and v2.align_corners is False
