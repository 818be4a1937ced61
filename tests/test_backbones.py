"""Backbone registry, interface, freezing and pretrained-weight loading (random init, CPU)."""

from __future__ import annotations

import logging
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from wsss.models import (
    BACKBONES,
    Backbone,
    PretrainedWeightsError,
    build_backbone,
    load_pretrained,
)

RESNETS = ["resnet18", "resnet50", "resnet101", "resnet18_os8", "resnet50_os8", "resnet101_os8"]


def _bn_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _check_taps(model: Backbone, taps: dict, size: int) -> None:
    assert list(taps) == list(model.tap_channels)
    assert list(taps)[-1] == "out"
    for name, t in taps.items():
        stride = model.tap_strides[name]
        assert t.shape[1:] == (model.tap_channels[name], size // stride, size // stride), name
        assert torch.isfinite(t).all(), name
    assert model.tap_channels["out"] == model.out_channels
    assert model.tap_strides["out"] == model.output_stride


def _check_grads(model: Backbone) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} is trainable but got no gradient"
            assert torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"


def test_registry_names():
    assert set(BACKBONES.names()) == set(RESNETS) | {"resnet38"}


def test_unknown_backbone_lists_names():
    with pytest.raises(KeyError) as info:
        build_backbone("resnet999")
    for name in ["resnet18", "resnet38", "resnet50_os8"]:
        assert name in str(info.value)


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_forward_backward(name):
    torch.manual_seed(0)
    model = build_backbone(name).train()
    assert isinstance(model, Backbone)
    assert model.output_stride == (8 if name.endswith("_os8") else 16)
    assert model.out_channels == (512 if name.startswith("resnet18") else 2048)
    x = torch.randn(2, 3, 64, 64)
    taps = model.forward_dict(x)
    _check_taps(model, taps, 64)
    # IRN default: stages 1-2 frozen and detached, stages 3-4 train.
    assert not taps["stage2"].requires_grad and taps["stage3"].requires_grad
    out = model(x)
    assert torch.equal(out, taps["out"])
    out.square().mean().backward()
    _check_grads(model)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}


def test_resnet_state_dict_keys_are_torchvision():
    for name, ctor, kwargs in [
        ("resnet18_os8", torchvision.models.resnet18, {}),
        ("resnet50_os8", torchvision.models.resnet50, {"replace_stride_with_dilation": [False, True, True]}),
    ]:
        ours = build_backbone(name).state_dict()
        ref = ctor(**kwargs).state_dict()
        assert set(ours) == {k for k in ref if not k.startswith("fc.")}
        assert all(ours[k].shape == ref[k].shape for k in ours)


def test_resnet_strides_and_dilations():
    irn = build_backbone("resnet50")  # IRN: strides (2, 2, 2, 1), no dilation
    assert irn.layer4[0].conv2.stride == (1, 1) and irn.layer4[0].downsample[0].stride == (1, 1)
    assert irn.layer3[0].conv2.stride == (2, 2)
    assert all(m.dilation == (1, 1) for m in irn.modules() if isinstance(m, nn.Conv2d))

    r18 = build_backbone("resnet18_os8")  # BasicBlock dilation, torchvision's rule
    for layer in (r18.layer3, r18.layer4):
        assert layer[0].conv1.stride == (1, 1) and layer[0].downsample[0].stride == (1, 1)
    assert (r18.layer3[0].conv1.dilation, r18.layer3[0].conv2.dilation) == ((1, 1), (2, 2))
    assert (r18.layer3[1].conv1.dilation, r18.layer3[1].conv2.dilation) == ((2, 2), (2, 2))
    assert (r18.layer4[0].conv1.dilation, r18.layer4[0].conv2.dilation) == ((2, 2), (4, 4))
    assert (r18.layer4[1].conv1.dilation, r18.layer4[1].conv2.dilation) == ((4, 4), (4, 4))
    assert r18.layer4[1].conv2.padding == (4, 4)

    r50 = build_backbone("resnet50_os8")
    assert r50.layer4[1].conv2.dilation == (4, 4) and r50.layer3[1].conv2.dilation == (2, 2)


def test_freeze_bn_survives_train():
    torch.manual_seed(0)
    model = build_backbone("resnet18", trainable_from="all")
    for bn in _bn_layers(model):  # non-trivial statistics, to see that they stay put
        bn.running_mean.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    model.train()
    for bn in _bn_layers(model):
        assert not bn.training
        assert not bn.weight.requires_grad and not bn.bias.requires_grad
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    _check_grads(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.layer1.training and model.training  # only BN is held in eval


def test_freeze_bn_false_trains_bn():
    model = build_backbone("resnet18", freeze_bn=False, trainable_from="all").train()
    assert all(bn.training and bn.weight.requires_grad for bn in _bn_layers(model))
    before = model.layer4[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    assert not torch.equal(before, model.layer4[0].bn1.running_mean)
    _check_grads(model)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("trainable_from", [None, "all", "stage2", "stage4"])
def test_trainable_from(trainable_from):
    model = build_backbone("resnet18", freeze_bn=False, trainable_from=trainable_from).train()
    stages = ["stage1", "stage2", "stage3", "stage4"]
    first = 0 if trainable_from in (None, "all") else stages.index(trainable_from)
    taps = model.forward_dict(torch.randn(2, 3, 64, 64))
    for i, name in enumerate(stages):
        assert taps[name].requires_grad == (i >= first), name
        assert model.is_frozen_stage(name) == (i < first)
    for module in model.frozen_modules():
        assert not module.training
    taps["out"].mean().backward()
    _check_grads(model)
    assert model.conv1.weight.requires_grad == (first == 0)
    assert model.layer4[0].conv1.weight.requires_grad


def test_trainable_from_default_when_unset():
    assert build_backbone("resnet18").trainable_from == "stage3"
    assert build_backbone("resnet18", trainable_from=None).trainable_from is None


def test_trainable_from_invalid():
    with pytest.raises(ValueError, match="stage3"):
        build_backbone("resnet18", trainable_from="layer3")


# -- ResNet-38: one instance for the whole module (about 105M parameters) ----------------------


@pytest.fixture(scope="module")
def resnet38():
    torch.manual_seed(0)
    return build_backbone("resnet38", dropout=(0.2, 0.2))


def _official_resnet38_keys():
    """State_dict keys of the official PyTorch conversion of the MXNet A1 weights."""
    bn = ["weight", "bias", "running_mean", "running_var"]
    blocks = ["b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4"] + [f"b4_{i}" for i in range(1, 6)]
    blocks += ["b5", "b5_1", "b5_2"]
    keys = {"conv1a.weight"} | {f"bn7.{p}" for p in bn}
    for b in blocks + ["b6", "b7"]:
        branches = ["2a", "2b1"] + (["2b2"] if b in ("b6", "b7") else [])
        for br in branches:
            keys |= {f"{b}.bn_branch{br}.{p}" for p in bn} | {f"{b}.conv_branch{br}.weight"}
        if b in ("b2", "b3", "b4", "b5", "b6", "b7"):
            keys.add(f"{b}.conv_branch1.weight")
    return keys


def test_resnet38_layout(resnet38):
    own = {k for k in resnet38.state_dict() if not k.endswith("num_batches_tracked")}
    assert own == _official_resnet38_keys()
    sd = resnet38.state_dict()
    assert sd["b5.conv_branch2a.weight"].shape == (512, 512, 3, 3)
    assert sd["b5.conv_branch1.weight"].shape == (1024, 512, 1, 1)
    assert sd["b6.conv_branch2a.weight"].shape == (512, 1024, 1, 1)
    assert sd["b6.conv_branch2b1.weight"].shape == (1024, 512, 3, 3)
    assert sd["b7.conv_branch2b2.weight"].shape == (4096, 2048, 1, 1)
    assert all(m.bias is None for m in resnet38.modules() if isinstance(m, nn.Conv2d))
    assert (resnet38.b5.conv_branch2a.dilation, resnet38.b5.conv_branch2b1.dilation) == ((1, 1), (2, 2))
    assert resnet38.b5_2.conv_branch2a.dilation == (2, 2)
    assert resnet38.b6.conv_branch2b1.dilation == (4, 4) and resnet38.b7.conv_branch2b1.dilation == (4, 4)
    assert [resnet38.b6.dropout_2b1.p, resnet38.b7.dropout_2b2.p] == [0.2, 0.2]
    assert resnet38.output_stride == 8 and resnet38.out_channels == 4096


def test_resnet38_forward_backward(resnet38):
    resnet38.eval()
    resnet38.train()
    assert all(not bn.training and not bn.weight.requires_grad for bn in _bn_layers(resnet38))
    assert resnet38.b6.dropout_2b1.training
    taps = resnet38.forward_dict(torch.randn(1, 3, 32, 32))
    _check_taps(resnet38, taps, 32)
    assert [taps[k].shape[1] for k in ("conv4", "conv5", "conv6")] == [512, 1024, 4096]
    assert (taps["conv4"] >= 0).all() and (taps["conv5"] >= 0).all()  # BN-ReLU'd block inputs
    taps["out"].mean().backward()
    _check_grads(resnet38)
    # default trainable_from="b3": conv1a and b2..b2_2 frozen, as AEFT/KTSE/HFPL/SMAF
    params = resnet38.named_parameters()
    frozen = {n.split(".")[0] for n, p in params if not p.requires_grad and "bn" not in n}
    assert frozen == {"conv1a", "b2", "b2_1", "b2_2"}
    resnet38.zero_grad(set_to_none=True)


def test_resnet38_imagenet_explains_conversion(resnet38):
    with pytest.raises(RuntimeError, match="resnet38_weights.md"):
        load_pretrained(resnet38, "imagenet", "resnet38")


def test_resnet38_bad_options():
    with pytest.raises(ValueError, match="dropout"):
        BACKBONES.get("resnet38")(dropout=(0.3,))  # checked before any layer is built


# -- pretrained weights -------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", [None, "state_dict"])
def test_pretrained_path_round_trip(tmp_path, wrapper):
    torch.manual_seed(0)
    src = build_backbone("resnet18")
    for bn in _bn_layers(src):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state["module.fc.weight"] = torch.randn(1000, 512)  # classifier head: ignored
    state["module.fc.bias"] = torch.randn(1000)
    path = tmp_path / "weights.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, path)

    dst = build_backbone("resnet18", pretrained=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), dst.eval()(x))
    report = load_pretrained(dst, path, "resnet18")
    assert report.missing == [] and report.unexpected == []


def test_pretrained_partial_file_logs_counts(tmp_path, caplog):
    src = build_backbone("resnet18").state_dict()
    path = tmp_path / "partial.pth"
    torch.save({"conv1.weight": src["conv1.weight"], "other.weight": torch.zeros(3)}, path)
    with caplog.at_level(logging.INFO, logger="wsss.models.weights"):
        report = load_pretrained(build_backbone("resnet18"), path, "resnet18")
    assert report.loaded == 1 and report.unexpected == ["other.weight"]
    assert "layer1.0.conv1.weight" in report.missing
    assert any("1 file keys unused" in r.getMessage() for r in caplog.records)
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_pretrained_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet18", pretrained=str(path))


def test_pretrained_unreadable_file(tmp_path):
    path = tmp_path / "resnet38.params"
    path.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedWeightsError, match="resnet38.params.*resnet38_weights.md"):
        build_backbone("resnet18", pretrained=str(path))


def test_pretrained_no_matching_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.conv.weight": torch.zeros(1), "fc.weight": torch.zeros(2)}, path)
    with pytest.raises(PretrainedWeightsError, match="none of the 1 keys"):
        build_backbone("resnet18", pretrained=str(path))


def test_pretrained_shape_mismatch(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"layer1.0.conv1.weight": torch.zeros(1, 1, 1, 1)}, path)
    with pytest.raises(PretrainedWeightsError, match="layer1.0.conv1.weight"):
        build_backbone("resnet18", pretrained=str(path))


def test_pretrained_nested_backbone_prefix(tmp_path):
    src = build_backbone("resnet18")
    path = tmp_path / "cam.pth"
    state = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    state["classifier.weight"] = torch.zeros(20, 512, 1, 1)
    torch.save({"model": state}, path)
    report = load_pretrained(build_backbone("resnet18"), path, "resnet18")
    assert report.missing == [] and report.loaded == len(src.state_dict())


@pytest.mark.parametrize("method", ["cam", "cam+islfsl"])
def test_pretrained_from_a_classifier_state(tmp_path, method):
    """IRN's `pretrained: classifier` loads the backbone out of a whole method's state_dict, also
    of a wrapping method whose backbone sits under 'base.backbone.'."""
    from wsss.methods import build_method

    trained = build_method(method, num_classes=4, backbone=build_backbone("resnet18"))
    with torch.no_grad():
        for p in trained.parameters():
            p.uniform_(-1, 1)
    path = tmp_path / "model.pt"
    torch.save({"model": trained.state_dict()}, path)
    target = build_backbone("resnet18")
    report = load_pretrained(target, path, "resnet18")
    assert report.missing == [] and report.loaded == len(target.state_dict())
    src = dict(trained.named_modules())["base.backbone" if "+" in method else "backbone"]
    assert torch.equal(target.conv1.weight, src.conv1.weight)


def test_imagenet_uses_torchvision_weights(monkeypatch):
    ref = torchvision.models.resnet18().state_dict()
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append((self, kwargs))
        return ref

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", fake_get_state_dict)
    model = build_backbone("resnet18_os8", pretrained="imagenet")
    assert calls == [(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, {"progress": True})]
    assert torch.equal(model.layer4[1].conv2.weight, ref["layer4.1.conv2.weight"])


def test_imagenet_offline_is_clear(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError) as info:
        build_backbone("resnet50", pretrained="imagenet")
    msg = str(info.value)
    assert "could not download" in msg and torch.hub.get_dir() in msg and "path" in msg
    assert "resnet50-0676ba61.pth" in msg


def test_imagenet_v2_not_for_resnet18():
    with pytest.raises(PretrainedWeightsError, match="IMAGENET1K_V2"):
        build_backbone("resnet18", pretrained="imagenet_v2")
