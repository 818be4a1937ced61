"""ACR: loss pieces on hand-worked tensors, the U-Net, which network each phase updates, the
reconstructor optimiser's schedule and checkpoint, the ablation modes, and a real engine run."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from torch.utils.data import Dataset

from wsss.engine import (
    TrainConfig,
    build_optimizer,
    load_checkpoint,
    load_model_state,
    poly_scheduler,
    save_model,
    train,
)
from wsss.methods import acr as A
from wsss.methods import build_method, required_files
from wsss.methods.base import StepContext
from wsss.models import build_backbone

#: a small but complete ACR (the official sizes are the defaults; these keep CPU tests fast)
SMALL = {"head_dim": 16, "recon_dims": [8, 8, 16], "unet_depth": 5, "unet_width": 8}
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("single_thread")


def _ctx(epoch=0, step=0):
    return StepContext(step=step, max_step=10, epoch=epoch, max_epoch=2, device=CPU)


def _acr(classes=3, seed=0, **options):
    torch.manual_seed(seed)
    bb = build_backbone("resnet18", pretrained="none", freeze_bn=False, trainable_from=None)
    return build_method("acr", num_classes=classes, backbone=bb, **{**SMALL, **options})


def _batch(b=2, size=32, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(b, classes)
    y[torch.arange(b), torch.arange(b) % classes] = 1.0
    y[0, classes - 1] = 1.0
    return {"image": torch.randn(b, 3, size, size, generator=g), "label": y}


def _scaler():
    return torch.amp.GradScaler("cuda", enabled=False)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    now = module.state_dict()
    return {k for k in before if not torch.equal(before[k], now[k])}


# ----------------------------------------------------------------------------------------------
# pure pieces
# ----------------------------------------------------------------------------------------------


def test_masked_l1_hand_values():
    recon = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2).expand(1, 3, 1, 2)
    image = torch.zeros(1, 3, 1, 2)
    mask = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    assert A.masked_l1(recon, image, mask).item() == pytest.approx(3 / 6)  # mean over all 6 elements
    mask = torch.tensor([0.5, 1.0]).reshape(1, 1, 1, 2)
    assert A.masked_l1(recon, image, mask).item() == pytest.approx((3 * 0.5 + 3 * 2.0) / 6)


def test_masked_l1_valid_uses_valid_images_only():
    recon = torch.stack([torch.ones(3, 1, 2), 5 * torch.ones(3, 1, 2)])
    image, mask = torch.zeros(2, 3, 1, 2), torch.ones(2, 1, 1, 2)
    assert A.masked_l1_valid(recon, image, mask, torch.tensor([True, False])).item() == pytest.approx(1.0)
    assert A.masked_l1_valid(recon, image, mask, torch.tensor([True, True])).item() == pytest.approx(3.0)
    r = recon.clone().requires_grad_()
    none = A.masked_l1_valid(r, image, mask, torch.tensor([False, False]))
    none.backward()
    assert none.item() == 0.0 and torch.all(r.grad == 0)


def test_ru_masks_follow_paper_eqs_3_to_10():
    a = torch.tensor([0.25])
    # g = 1 (decomposed cell, = no SRF): X_t = A_t X validated on 1 - A_t; X_nt = (1 - A_t) X on A_t
    m = A.ru_masks(a, torch.ones(1))
    assert [m[k].item() for k in ("in_t", "v_t", "in_nt", "v_nt")] == pytest.approx([0.25, 0.75, 0.75, 0.25])
    # g = 0 (remnant cell, paper g = 1): the whole feature is fed, nothing is validated (Eqs. 8-10)
    m = A.ru_masks(a, torch.zeros(1))
    assert [m[k].item() for k in ("in_t", "v_t", "in_nt", "v_nt")] == pytest.approx([1.0, 0.0, 1.0, 0.0])


def test_cu_masks_code_and_paper():
    a = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    seg = torch.tensor([True, False, True])
    m = A.cu_masks(a, seg, "code")
    assert m["v_t"].tolist() == [1.0, 0.0, 0.0] and m["v_nt"].tolist() == [0.0, 0.0, 1.0]
    p = A.cu_masks(a, seg, "paper")
    assert p["v_t"].tolist() == [1.0, 0.5, 0.0] and p["v_nt"].tolist() == [0.0, 0.5, 1.0]
    assert not any(v.requires_grad for v in list(m.values()) + list(p.values()))  # detached
    with pytest.raises(ValueError, match="cu_masks"):
        A.cu_masks(a, seg, "other")


def test_target_class_sampling_and_srf_schedule():
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    torch.manual_seed(0)
    draws = torch.stack([A.sample_target_classes(y) for _ in range(400)])
    assert set(draws[:, 0].tolist()) == {0, 2} and set(draws[:, 1].tolist()) == {1}
    assert 0.4 < (draws[:, 0] == 0).float().mean() < 0.6  # uniform among the labels
    with pytest.raises(ValueError, match="label"):
        A.sample_target_classes(torch.zeros(1, 3))
    assert A.srf_probability(0) == pytest.approx(0.20)
    assert A.srf_probability(39) == pytest.approx(0.59)
    assert A.srf_probability(200) == 1.0
    g = A.srf_grid(64, 16, 0.3, (64, 64), CPU, torch.Generator().manual_seed(0))
    assert g.shape == (64, 1, 64, 64) and set(g.unique().tolist()) <= {0.0, 1.0}
    blocks = g.reshape(64, 1, 16, 4, 16, 4)
    assert torch.all(blocks == blocks[:, :, :, :1, :, :1])  # constant on each 4x4 cell
    assert g.mean().item() == pytest.approx(0.3, abs=0.03)


def test_target_cam_is_max_normalised_label_masked_and_differentiable():
    cams = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    t = torch.tensor([2, 1])
    a = A.target_cam(cams, y, t, (8, 8))
    assert a.shape == (2, 1, 8, 8) and a.min() >= 0 and a.max() <= 1
    a.sum().backward()
    assert cams.grad[0, 2].abs().sum() > 0 and cams.grad[0, 0].abs().sum() == 0


def test_unet_decoder_layout():
    d = A.UNetDecoder(16, 3, depth=8, width=8)
    assert d(torch.randn(1, 16, 256, 256)).shape == (1, 3, 256, 256)
    norms = sum(isinstance(m, torch.nn.InstanceNorm2d) for m in d.modules())
    drops = sum(isinstance(m, torch.nn.Dropout) for m in d.modules())
    assert norms == 6 + 7 and drops == 5 + 4  # pix2pix: no norm on down1/down8; dropout down4-8, up1-4
    full = A.UNetDecoder(448, 3, depth=8)
    assert [m.out_channels for m in full.modules() if isinstance(m, torch.nn.Conv2d)][:8] == [
        64,
        128,
        256,
        512,
        512,
        512,
        512,
        512,
    ]
    assert full.final[1].in_channels == 128 and full.final[1].bias is not None
    with pytest.raises(ValueError, match="divisible"):
        A.UNetDecoder(16, 3, depth=5, width=8)(torch.randn(1, 16, 48, 40))
    with pytest.raises(ValueError, match="unet_depth"):
        A.UNetDecoder(16, 3, depth=9)


def test_default_taps():
    from types import SimpleNamespace

    r38 = SimpleNamespace(tap_channels={"conv4": 512, "conv5": 1024, "conv6": 4096, "out": 4096})
    assert A.default_taps(r38) == ("conv4", "conv5", "conv6")
    assert A.default_taps(build_backbone("resnet18")) == ("stage2", "stage3", "stage4")


# ----------------------------------------------------------------------------------------------
# the method: which network each phase updates
# ----------------------------------------------------------------------------------------------


def test_ru_phase_updates_only_the_reconstructor():
    m = _acr().train()
    cls0, rec0 = _snapshot(m.classifier), _snapshot(m.reconstructor)
    m._sync_recon_optimizer(build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False)))
    out = m.ru_step(_batch(), _ctx(), m.recon_optimizer, _scaler())
    assert _changed(cls0, m.classifier) == set()
    changed = _changed(rec0, m.reconstructor)
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("decoder.") for k in changed)
    assert {"reduce.0.weight", "fc9.weight"} <= changed
    assert all(out[f"loss_ru_{k}"] >= 0 for k in ("cls", "full", "t", "nt"))


@pytest.mark.parametrize("cls_weight", [1.0, 0.0])
def test_cu_phase_updates_only_the_classifier(cls_weight):
    m = _acr(cls_weight=cls_weight).train()
    cls0, rec0 = _snapshot(m.classifier), _snapshot(m.reconstructor)
    opt = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False))
    out = m.cu_step(_batch(), _ctx(), opt, _scaler())
    assert _changed(rec0, m.reconstructor) == set()
    assert all(p.grad is None for p in m.reconstructor.parameters())
    changed = _changed(cls0, m.classifier)
    # with cls_weight 0 the update comes only through the target CAM A_t (the adversarial terms)
    assert any(k.startswith("backbone.") for k in changed) and {"fc8.weight", "fc9.weight"} <= changed
    assert out["loss_cu_t"] <= 0 and out["loss_cu_nt"] <= 0  # the classifier maximises the error
    assert all(p.requires_grad for p in m.reconstructor.parameters())  # flags restored


def test_train_step_runs_both_phases_with_two_optimisers():
    m = _acr().train()
    opt = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False))
    sched = poly_scheduler(opt, max_step=10, power=0.9)
    engine_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    recon_ids = {id(p) for g in m.recon_optimizer.param_groups for p in g["params"]}
    assert engine_ids == {id(p) for p in m.classifier.parameters() if p.requires_grad}
    assert recon_ids == {id(p) for p in m.reconstructor.parameters()} and not engine_ids & recon_ids
    for step in range(3):
        out = m.train_step(_batch(seed=step), _ctx(step=step), opt, _scaler())
        sched.step()
    assert {"loss_ru_t", "loss_ru_nt", "loss_cu_t", "loss_cu_nt", "loss_cu_cls", "lr_recon", "loss_total"} <= set(out)
    assert all(math.isfinite(v) for v in out.values())
    # the reconstructor follows the engine's poly factor with ACR's multipliers (x1, x2 bias, x10 ConvT)
    factor = (1 - 3 / 10) ** 0.9
    m._sync_recon_optimizer(opt)
    lrs = {g["name"]: g["lr"] for g in m.recon_optimizer.param_groups}
    assert lrs == pytest.approx({"recon": 0.01 * factor, "recon_bias": 0.02 * factor, "recon_convT": 0.1 * factor})
    assert {g["name"]: g["weight_decay"] for g in m.recon_optimizer.param_groups}["recon_bias"] == 0.0
    with pytest.raises(RuntimeError, match="train_step"):
        m.losses(_batch(), _ctx())


def test_recon_optimizer_state_round_trip():
    m = _acr().train()
    opt = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False, momentum_mode="standard"))
    m.train_step(_batch(), _ctx(), opt, _scaler())
    state = m.extra_state_dict()
    other = _acr(seed=5)
    other.load_extra_state_dict(copy.deepcopy(state))
    a, b = m.recon_optimizer.state_dict(), other.recon_optimizer.state_dict()
    assert a["state"] and a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"])
    with pytest.raises(RuntimeError, match="reconstructor optimiser"):
        other.load_extra_state_dict(None)


def test_recon_optimizer_follows_an_adamw_engine():
    m = _acr().train()
    opt = build_optimizer(m.param_groups(), TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4, amp=False))
    assert isinstance(m.recon_optimizer, torch.optim.SGD)  # until the first step
    m.train_step(_batch(), _ctx(), opt, _scaler())
    assert isinstance(m.recon_optimizer, torch.optim.AdamW) and m.recon_optimizer.state
    groups = {g["name"]: g for g in m.recon_optimizer.param_groups}
    assert groups["recon"]["lr"] == pytest.approx(1e-3) and groups["recon_convT"]["lr"] == pytest.approx(1e-2)
    assert groups["recon"]["weight_decay"] == pytest.approx(1e-4) and groups["recon_bias"]["weight_decay"] == 0.0
    assert groups["recon"]["betas"] == opt.defaults["betas"]
    sgd = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False))
    with pytest.raises(RuntimeError, match="already stepped"):
        m._sync_recon_optimizer(sgd)  # a stepped AdamW state is never silently dropped


class _RandomSet(Dataset):
    def __init__(self, n=4, classes=3, size=32):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = (torch.rand(n, classes, generator=g) > 0.5).float()
        self.y[:, 0] = 1.0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "index": i}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_engine_resume_restores_the_reconstructor_optimiser(tmp_path, optimizer):
    cfg = TrainConfig(epochs=2, batch_size=2, lr=0.01, seed=3, amp=False, momentum_mode="standard", optimizer=optimizer)
    resolved = {"classifier": {"method": "acr"}}
    train(
        _acr(), _RandomSet(), cfg, tmp_path / "a" / "model.pt", tmp_path / "a", resolved_config=resolved, progress=False
    )
    train(
        _acr(),
        _RandomSet(),
        cfg,
        tmp_path / "b" / "model.pt",
        tmp_path / "b",
        resolved_config=resolved,
        progress=False,
        stop_after_epochs=1,
    )
    extra = load_checkpoint(tmp_path / "b" / "last.pt")["method_extra"]
    assert "recon_optimizer" in extra
    assert extra["recon_optimizer_class"] == {"sgd": "SGD", "adamw": "AdamW"}[optimizer]
    train(
        _acr(seed=9),
        _RandomSet(),
        cfg,
        tmp_path / "b" / "model.pt",
        tmp_path / "b",
        resolved_config=resolved,
        progress=False,
    )
    a, b = (
        load_model_state(tmp_path / "a" / "model.pt")["model"],
        load_model_state(tmp_path / "b" / "model.pt")["model"],
    )
    assert a.keys() == b.keys() and any(k.startswith("reconstructor.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------------------------
# options and ablations
# ----------------------------------------------------------------------------------------------


def test_required_files_for_the_workflow():
    assert required_files({"classifier": {"method": "cam"}}) == []
    assert required_files({"method": "acr", "method_options": {}}) == []
    c = {
        "method": "acr",
        "method_options": {"reconstructor": "frozen", "reconstructor_init": "r/P/classifier/model.pt"},
    }
    assert required_files({"classifier": c}) == ["r/P/classifier/model.pt"]
    both = {"classifier_init": "r/A/classifier/model.pt", "reconstructor_init": "r/P/classifier/model.pt"}
    assert A.ACRMethod.required_files(both) == ["r/A/classifier/model.pt", "r/P/classifier/model.pt"]


def test_option_errors():
    with pytest.raises(TypeError):
        _acr(no_such_option=1)
    with pytest.raises(ValueError, match="reconstructor"):
        _acr(reconstructor="gan")
    with pytest.raises(ValueError, match="classifier_init"):
        _acr(reconstructor="pretrain")
    with pytest.raises(ValueError, match="reconstructor_init"):
        _acr(reconstructor="frozen")
    with pytest.raises(ValueError, match="recon_taps"):
        _acr(recon_taps=["stage1", "nope", "stage4"])


@pytest.fixture(scope="module")
def acr_model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("acr") / "model.pt"
    save_model(path, _acr(seed=11), {"classifier": {"method": "acr"}})
    return path


def test_pretrain_and_frozen_modes_load_and_freeze(acr_model_file):
    src = load_model_state(acr_model_file)["model"]
    pre = _acr(reconstructor="pretrain", classifier_init=str(acr_model_file))
    for k, v in pre.classifier.state_dict().items():
        torch.testing.assert_close(v, src[f"classifier.{k}"])
    assert not any(p.requires_grad for p in pre.classifier.parameters()) and pre.recon_optimizer is None
    assert {id(p) for g in pre.param_groups() for p in g["params"]} == {id(p) for p in pre.reconstructor.parameters()}
    fro = _acr(reconstructor="frozen", reconstructor_init=str(acr_model_file))
    for k, v in fro.reconstructor.state_dict().items():
        torch.testing.assert_close(v, src[f"reconstructor.{k}"])
    assert not any(p.requires_grad for p in fro.reconstructor.parameters())
    with pytest.raises(ValueError, match="acr"):
        torch.save({"model": {"x": torch.zeros(1)}}, acr_model_file.parent / "bad.pt")
        _acr(reconstructor="frozen", reconstructor_init=str(acr_model_file.parent / "bad.pt"))


ABLATIONS = [
    {"reconstructor": "adversarial", "srf": True},  # Table 1
    {"reconstructor": "adversarial", "srf": False},
    {"reconstructor": "pretrain", "srf": True},
    {"reconstructor": "pretrain", "srf": False},
    {"reconstructor": "frozen", "srf": True},
    {"reconstructor": "frozen", "srf": False},
    {"cu_weight_t": 0.0, "cu_weight_nt": 0.0},  # Table 2 (a) = the baseline
    {"cu_weight_nt": 0.0},  # (b)
    {"cu_weight_t": 0.0},  # (c)
    {"cu_masks": "paper"},
    {"ru_weight_nt": 0.5, "ru_cls_weight": 0.0, "ru_full_weight": 0.0},  # the paper's RU loss (Eq. 7)
]


@pytest.mark.parametrize("opts", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_ablation_runs_one_step(opts, acr_model_file):
    opts = dict(opts)
    if opts.get("reconstructor") == "pretrain":
        opts["classifier_init"] = str(acr_model_file)
    if opts.get("reconstructor") == "frozen":
        opts["reconstructor_init"] = str(acr_model_file)
    m = _acr(**opts).train()
    opt = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False))
    out = m.train_step(_batch(), _ctx(epoch=1), opt, _scaler())
    assert all(math.isfinite(v) for v in out.values())
    mode = opts.get("reconstructor", "adversarial")
    assert ("loss_ru_total" in out) == (mode != "frozen") and ("loss_cu_total" in out) == (mode != "pretrain")


def test_forward_backward_64px():
    m = _acr(unet_depth=6).train()
    b = _batch(b=2, size=64)
    assert m.cam(b["image"]).shape == (2, 3, 4, 4) and m.logits(b["image"]).shape == (2, 3)
    out = m.train_step(b, _ctx(), build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False)), _scaler())
    assert all(math.isfinite(v) for v in out.values())


def test_trains_through_the_engine_on_the_tiny_dataset(tiny_cfg, tmp_path, monkeypatch):
    import wsss.engine
    from wsss.data import open_dataset
    from wsss.data.base import write_labels_csv
    from wsss.pipeline import load_classifier, train_classifier

    cfg = copy.deepcopy(tiny_cfg)
    cfg["classifier"].update(method="acr", method_options={**SMALL, "unet_depth": 6}, batch_size=8, lr=0.01)
    ds = open_dataset(cfg)
    ids = ds.ids("train_aug")
    write_labels_csv(tmp_path / "labels.csv", ids, {i: ds.labels(i) for i in ids}, ds.class_names)
    saved = []  # the epoch checkpoints (deleted once model.pt is written)
    save = wsss.engine.save_checkpoint
    monkeypatch.setattr(
        wsss.engine, "save_checkpoint", lambda path, **state: saved.append(state) or save(path, **state)
    )
    model = train_classifier(
        cfg, str(tmp_path / "labels.csv"), str(tmp_path / "model.pt"), str(tmp_path / "work"), progress=False
    )
    with open(tmp_path / "work" / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * (len(ids) // 8)
    assert {"loss_ru_t", "loss_ru_nt", "loss_cu_t", "loss_cu_nt", "lr_recon", "lr_backbone"} <= set(rows[0])
    for r in rows:  # the reconstructor's lr follows the classifier's poly schedule
        assert float(r["lr_recon"]) == pytest.approx(float(r["lr_backbone"]))
    assert float(rows[-1]["lr_recon"]) < float(rows[0]["lr_recon"])
    epochs = [st for st in saved if "optimizer" in st]  # not the final model file
    assert len(epochs) == 2 and all("recon_optimizer" in st["method_extra"] for st in epochs)
    assert not (tmp_path / "work" / "last.pt").exists()
    m = load_classifier(cfg, str(model), ds.num_fg_classes).eval()
    assert m.cam(torch.zeros(1, 3, 64, 64)).shape == (1, ds.num_fg_classes, 4, 4)
