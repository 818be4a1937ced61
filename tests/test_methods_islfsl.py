"""ISL/FSL add-on (HFPL): loss functions on hand-worked tensors, chunked == naive FSL, the
``"<method>+islfsl"`` wrapper (naming, options, GAP mixing, gradients) and a real engine run."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wsss.engine import TrainConfig, build_optimizer, train_step
from wsss.methods import build_method, list_methods
from wsss.methods import islfsl as IF
from wsss.methods.base import StepContext
from wsss.models import build_backbone

CTX = StepContext(step=0, max_step=10, epoch=0, max_epoch=1, device=torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("single_thread")


def _method(name="cam+islfsl", classes=4, **options):
    torch.manual_seed(0)
    bb = build_backbone("resnet18", pretrained="none", freeze_bn=True, trainable_from=None)
    return build_method(name, num_classes=classes, backbone=bb, **options)


def _batch(b=2, size=32, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(b, classes)
    y[torch.arange(b), torch.arange(b) % classes] = 1.0
    y[0, classes - 1] = 1.0
    return {"image": torch.randn(b, 3, size, size, generator=g), "label": y}


# ----------------------------------------------------------------------------------------------
# pure functions, hand-worked values
# ----------------------------------------------------------------------------------------------


def test_max_norm_hand_values():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 4)
    e = 1e-5
    expected = torch.tensor([0.0, 0.0, (1 - e) / (3 + e), (3 - e) / (3 + e)]).reshape(1, 1, 1, 4)
    torch.testing.assert_close(IF.max_norm(x), expected)


def test_binomial_isl_hand_values_and_gradient_only_at_samples():
    # pixel 0 has sigmoid ~ 0.982, pixel 1 sigmoid = 0 -> weight 1e-5: (almost) every sample is pixel 0
    cams = torch.tensor([4.0, -1e4]).reshape(1, 1, 1, 2).requires_grad_()
    gen = torch.Generator().manual_seed(0)
    loss = IF.isl_binomial(cams, torch.ones(1, 1), num_samples=10, generator=gen)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-4.0)), rel=1e-5)  # BCE(4, 1) = softplus(-4)
    loss.backward()
    assert cams.grad[0, 0, 0, 1] == 0 and cams.grad[0, 0, 0, 0] != 0
    neg = IF.isl_binomial(cams.detach(), torch.zeros(1, 1), num_samples=10, generator=torch.Generator().manual_seed(0))
    assert neg.item() == pytest.approx(math.log1p(math.exp(4.0)), rel=1e-5)  # BCE(4, 0) = softplus(4)


def test_binomial_isl_is_importance_weighted_bce_in_expectation():
    torch.manual_seed(1)
    cams = torch.randn(1, 2, 3, 3)
    y = torch.tensor([[1.0, 0.0]])
    loss = IF.isl_binomial(cams, y, num_samples=40000, generator=torch.Generator().manual_seed(3))
    p = torch.sigmoid(cams) + 1e-5
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        cams, y[:, :, None, None].expand_as(cams), reduction="none"
    )
    expected = ((p * bce).flatten(2).sum(-1) / p.flatten(2).sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=0.02)


def test_multinomial_isl_hand_value():
    # one class, implicit background logit 0: a = softmax([0, ln 3]) = 3/4 at pixel 0, ~0 at pixel 1
    cams = torch.tensor([math.log(3.0), -1e4]).reshape(1, 1, 1, 2)
    loss = IF.isl_multinomial(cams, torch.ones(1, 1), num_samples=10, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(-math.log(0.75), rel=1e-5)
    post = IF.multinomial_posterior(cams)
    torch.testing.assert_close(post.sum(1), torch.ones(1, 1, 2))


def _two_pixel_fsl(pred_values, colours, sigma=1.0, mu=2.5):
    pred = torch.tensor(pred_values, dtype=torch.float32).reshape(1, 1, 1, 2)
    col = torch.tensor(colours, dtype=torch.float32).T.reshape(1, 3, 1, 2)
    return IF.fsl_loss_naive(pred, col, mu, sigma), IF.fsl_loss(pred, col, mu, sigma, chunk=1)


def test_fsl_two_pixels_hand_values():
    k = math.exp(-0.5) / (2 * math.pi)  # sigma = 1, neighbours at distance 1
    # same colour: delta = 0 -> gate = tanh(2.5 + log(1e-5 / (1 + 1e-5))) ~ -1: a positive loss
    gate_same = math.tanh(2.5 + math.log(1e-5 / (1 + 1e-5)))
    naive, chunked = _two_pixel_fsl([1.0, 0.0], [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    # L = -(1/(B*P)) * (W_12 + W_21) * 0.5 * (1 - 0)^2 = -k * gate / 2
    assert naive.item() == pytest.approx(-k * gate_same / 2, rel=1e-5)
    assert chunked.item() == pytest.approx(naive.item(), rel=1e-5)
    assert naive.item() > 0
    # black vs white: delta = 1 -> gate ~ +1: different predictions are rewarded (negative loss)
    gate_diff = math.tanh(2.5 + math.log((1 + 1e-5) / 1e-5))
    naive, chunked = _two_pixel_fsl([1.0, 0.0], [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert naive.item() == pytest.approx(-k * gate_diff / 2, rel=1e-5) and naive.item() < 0
    assert chunked.item() == pytest.approx(naive.item(), rel=1e-5)
    # equal predictions: no loss whatever the colours
    naive, _ = _two_pixel_fsl([0.3, 0.3], [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert naive.item() == 0.0


@pytest.mark.parametrize("chunk", [1, 4, 35, 100])
def test_fsl_chunked_equals_naive_value_and_gradient(chunk):
    torch.manual_seed(0)
    pred = torch.rand(2, 3, 5, 7, dtype=torch.float64).float().requires_grad_()
    colours = torch.rand(2, 3, 5, 7)
    naive = IF.fsl_loss_naive(pred, colours, 2.5, 2.0)
    (g_naive,) = torch.autograd.grad(naive, pred)
    chunked = IF.fsl_loss(pred, colours, 2.5, 2.0, chunk=chunk)
    (g_chunked,) = torch.autograd.grad(chunked, pred)
    torch.testing.assert_close(chunked, naive, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_chunked, g_naive, rtol=1e-4, atol=1e-7)


def test_fsl_memory_is_bounded_by_the_chunk(monkeypatch):
    shapes = []
    real = IF.fsl_pair_weights

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(IF, "fsl_pair_weights", spy)
    IF.fsl_loss(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), chunk=64)
    assert shapes and all(s[1] <= 64 and s[2] == 256 for s in shapes)
    assert sum(s[1] for s in shapes) == 256  # every row exactly once


def test_binomial_fsl_prediction_masks_absent_classes_and_adds_background():
    cams = torch.tensor([[[[2.0, 0.0]], [[1.0, 3.0]], [[5.0, 1.0]]]])  # 1 x 3 x 1 x 2
    y = torch.tensor([[1.0, 0.0, 1.0]])
    pred = IF.binomial_fsl_prediction(cams, y, background=True)
    assert pred.shape == (1, 4, 1, 2)
    assert torch.all(pred[:, 2] == 0)  # class 1 absent
    fg = IF.max_norm(cams) * y[:, :, None, None]
    torch.testing.assert_close(pred[:, 1:], fg)
    torch.testing.assert_close(pred[:, 0], 1 - fg.max(1).values)
    assert IF.binomial_fsl_prediction(cams, y, background=False).shape == (1, 3, 1, 2)


def test_image_colours_undo_the_normalisation():
    rgb = torch.rand(1, 3, 4, 4)
    m = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    s = torch.tensor(IMAGENET_STD)[None, :, None, None]
    torch.testing.assert_close(IF.image_colours((rgb - m) / s, (4, 4)), rgb, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the wrapper
# ----------------------------------------------------------------------------------------------


def test_names_list_and_config_validation(tiny_cfg):
    from wsss.config import validate_config

    assert "cam+islfsl" in list_methods() and "cam" in list_methods()
    assert "acr+islfsl" not in list_methods()  # acr does not implement the protocol
    raw = {k: v for k, v in tiny_cfg.items()}
    raw["classifier"] = dict(tiny_cfg["classifier"], method="cam+islfsl", method_options={"islfsl": {"num_samples": 5}})
    assert validate_config(raw)["classifier"]["method"] == "cam+islfsl"


def test_build_errors():
    with pytest.raises(TypeError, match="no_such_option"):
        _method(islfsl={"no_such_option": 1})
    with pytest.raises(TypeError):
        _method(no_such_base_option=1)
    with pytest.raises(TypeError, match="mapping"):
        _method(islfsl=3)
    with pytest.raises(ValueError, match="twice"):
        _method("cam+islfsl+islfsl")
    with pytest.raises(KeyError, match="nope"):
        _method("nope+islfsl")
    with pytest.raises(TypeError, match="protocol"):
        _method("acr+islfsl")
    with pytest.raises(ValueError, match="posterior"):
        _method(islfsl={"posterior": "poisson"})
    with pytest.raises(ValueError, match="isl_lambda"):
        _method(islfsl={"isl_lambda": 1.5})


def test_defaults_follow_the_paper():
    m = _method()
    assert (m.isl, m.fsl, m.posterior, m.num_samples, m.isl_lambda) == (True, True, "binomial", 10, 0.2)
    assert (m.fsl_mu, m.fsl_sigma, m.fsl_weight, m.fsl_background) == (2.5, 5.0, 1.0, True)
    assert m.name == "cam+islfsl" and m.output_stride == 16
    assert all(k.startswith("base.") for k in m.state_dict())


def test_cam_protocol_outputs_match_the_baseline():
    m = _method("cam").eval()
    x = _batch()["image"]
    out = m.features_and_cams(x)
    torch.testing.assert_close(out["logits"], m.logits(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.relu(out["cams"]), m.cam(x))
    b = _batch()
    torch.testing.assert_close(m.losses_from_outputs(b, CTX, out)["cls"], m.losses(b, CTX)["cls"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
def test_isl_mixes_with_the_gap_term(lam):
    m = _method(islfsl={"isl_lambda": lam, "fsl": False}).eval()
    b = _batch()
    terms = m.losses(b, CTX)
    base = m.base.losses(b, CTX)["cls"]
    assert set(terms) == {"cls", "isl"}
    torch.testing.assert_close(terms["cls"], (1 - lam) * base, rtol=1e-5, atol=1e-6)
    if lam == 0.0:
        assert terms["isl"].item() == 0.0
    else:
        assert terms["isl"].item() > 0


def test_forward_backward_64px_reaches_the_backbone():
    m = _method(classes=4).train()
    b = _batch(b=4, size=64)
    terms = m.losses(b, CTX)
    assert set(terms) == {"cls", "isl", "fsl"}
    for name in ("isl", "fsl"):
        m.zero_grad()
        terms = m.losses(b, CTX)
        terms[name].backward()
        g = m.base.backbone.layer4[1].conv2.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


ABLATIONS = [
    {"fsl": False},  # ISL only (Table 4)
    {"fsl": False, "posterior": "multinomial", "isl_lambda": 0.6},
    {"isl": False},  # FSL only
    {"isl": False, "posterior": "multinomial"},
    {"num_samples": 1, "fsl": False, "isl_lambda": 1.0},  # Table 5
    {"num_samples": 100, "fsl": False, "isl_lambda": 1.0},
    {"isl_lambda": 0.0},  # Fig. 6
    {"isl_lambda": 1.0},
    {"fsl_background": False},
    {"fsl_upsample": 2, "fsl_chunk": 7},
    {"scale": 0.1},
    {"isl": False, "fsl": False},
]


@pytest.mark.parametrize("opts", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_ablation_runs_one_step(opts):
    m = _method(islfsl=opts).train()
    opt = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    out = train_step(m, _batch(), CTX, opt, scaler, use_amp=False)
    assert all(math.isfinite(v) for v in out.values())
    assert ("loss_isl" in out) == opts.get("isl", True) and ("loss_fsl" in out) == opts.get("fsl", True)


def test_trains_through_the_engine_on_the_tiny_dataset(tiny_cfg, tmp_path):
    import copy

    from wsss.data import open_dataset
    from wsss.data.base import write_labels_csv
    from wsss.pipeline import load_classifier, train_classifier

    cfg = copy.deepcopy(tiny_cfg)
    cfg["classifier"]["method"] = "cam+islfsl"
    cfg["classifier"]["method_options"] = {"islfsl": {"num_samples": 4}}
    ds = open_dataset(cfg)
    ids = ds.ids("train_aug")
    write_labels_csv(tmp_path / "labels.csv", ids, {i: ds.labels(i) for i in ids}, ds.class_names)
    model = train_classifier(
        cfg, str(tmp_path / "labels.csv"), str(tmp_path / "model.pt"), str(tmp_path / "work"), progress=False
    )
    with open(tmp_path / "work" / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * (len(ids) // cfg["classifier"]["batch_size"])
    assert {"loss_cls", "loss_isl", "loss_fsl", "loss_total"} <= set(rows[0])
    assert all(math.isfinite(float(r["loss_total"])) for r in rows)
    m = load_classifier(cfg, str(model), ds.num_fg_classes).eval()
    assert m.cam(torch.zeros(1, 3, 64, 64)).shape == (1, ds.num_fg_classes, 4, 4)
