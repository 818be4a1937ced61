"""The contract every method of the registry keeps (``wsss.methods.base.Method``), checked on each
name :func:`wsss.methods.list_methods` lists (``"<name>+islfsl"`` variants included), timm-style:
built on a small randomly initialised backbone, one training step on a random batch of two small
images.

* ``cam(images)``: ``B x C x h x w`` at the backbone's output stride, ReLU'd, finite;
  ``logits(images)``: ``B x C``;
* ``losses(batch, ctx)``: a dict of named scalar tensors, finite, whose sum back-propagates into the
  parameters (methods that take over the update with ``train_step``, ACR, return named finite
  ``loss_*`` numbers from it instead);
* one :func:`wsss.engine.train_step` updates the parameters;
* ``param_groups()`` covers only the method's own parameters; ``required_files(options)`` is a list
  of paths.

Methods that read a model file are built with the options their own tests use: SMAF with a teacher
``model.pt`` (tests/test_methods_smaf.py), ACR with the small sizes of tests/test_methods_acr.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from wsss.engine import TrainConfig, build_optimizer, save_model, train_step
from wsss.methods import METHODS, build_method, list_methods, required_files
from wsss.methods.base import ISLFSL_SUFFIX, Method, StepContext
from wsss.models import build_backbone

CLASSES = 3
SIZE = 32
CTX = StepContext(step=0, max_step=10, epoch=0, max_epoch=2, device=torch.device("cpu"))
TEACHER_CFG = {
    "method": "cam",
    "method_options": {},
    "backbone": "resnet18",
    "pretrained": "none",
    "backbone_options": {"freeze_bn": True, "trainable_from": None},
}
#: options of the methods that need them (the values their own tests use)
ACR_SMALL = {"head_dim": 16, "recon_dims": [8, 8, 16], "unet_depth": 5, "unet_width": 8}

NAMES = list_methods()


pytestmark = pytest.mark.usefixtures("single_thread")


def _backbone():
    return build_backbone("resnet18", pretrained="none", freeze_bn=True, trainable_from=None)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A trained-classifier file for SMAF: a randomly initialised ``cam`` method saved by the engine."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    save_model(path, build_method("cam", num_classes=CLASSES, backbone=_backbone()), {"classifier": TEACHER_CFG})
    return path


def _options(name: str, teacher_file) -> dict:
    base = name[: -len(ISLFSL_SUFFIX)] if name.endswith(ISLFSL_SUFFIX) else name
    if base == "smaf":
        return {"teacher_path": str(teacher_file), "scales": [0.5, 1.0]}
    if base == "acr":
        return dict(ACR_SMALL)
    return {}


def _batch():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    image = torch.randn(2, 3, SIZE, SIZE, generator=g)
    # saliency maps for the methods that train on them (EPS); the others ignore the key
    return {"image": image, "label": labels, "saliency": torch.rand(2, 1, SIZE, SIZE, generator=g)}


def _build(name: str, teacher_file) -> Method:
    torch.manual_seed(0)
    return build_method(name, num_classes=CLASSES, backbone=_backbone(), **_options(name, teacher_file))


def test_every_registered_method_is_listed():
    assert set(METHODS.names()) <= set(NAMES)
    assert {"cam", "smaf", "acr"} <= set(NAMES)
    for name in METHODS.names():
        assert issubclass(METHODS.get(name), Method), name


@pytest.mark.parametrize("name", NAMES)
def test_method_contract(name, teacher_file):
    m = _build(name, teacher_file)
    batch = _batch()
    b = batch["image"].shape[0]

    # identity and the workflow hook
    assert isinstance(m, Method)
    assert m.name == name
    base = name[: -len(ISLFSL_SUFFIX)] if name.endswith(ISLFSL_SUFFIX) else name
    files = METHODS.get(base).required_files(_options(name, teacher_file))
    assert isinstance(files, list) and all(isinstance(f, str) for f in files)
    assert files == ([str(teacher_file)] if base == "smaf" else [])
    cfg = {"classifier": {"method": name, "method_options": _options(name, teacher_file)}}
    assert required_files(cfg) == files

    # parameter groups: the method's own trainable parameters, each with an lr multiplier
    groups = m.param_groups()
    own = {id(p) for p in m.parameters()}
    assert groups and all(isinstance(g["lr_mult"], (int, float)) for g in groups)
    assert all(id(p) in own for g in groups for p in g["params"])

    # CAMs and logits (inference mode)
    m.eval()
    with torch.no_grad():
        cams = m.cam(batch["image"])
        logits = m.logits(batch["image"])
    side = math.ceil(SIZE / m.output_stride)
    assert cams.shape == (b, CLASSES, side, side), cams.shape
    assert torch.isfinite(cams).all() and (cams >= 0).all()
    assert logits.shape == (b, CLASSES) and torch.isfinite(logits).all()

    # the loss terms and their gradients
    m.train()
    custom_step = getattr(type(m), "train_step", None) is not None
    if not custom_step:
        terms = m.losses(batch, CTX)
        assert isinstance(terms, dict) and terms
        for key, value in terms.items():
            assert isinstance(key, str) and key
            assert isinstance(value, torch.Tensor) and value.dim() == 0, (key, value)
            assert torch.isfinite(value), (key, value)
        m.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad and p.grad is not None]
        assert grads, "no parameter got a gradient"
        assert all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        m.zero_grad(set_to_none=True)

    # one update through the engine
    before = {k: v.detach().clone() for k, v in m.state_dict().items() if v.is_floating_point()}
    optimizer = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    logged = train_step(m, batch, CTX, optimizer, scaler, use_amp=False)
    assert logged and all(isinstance(k, str) and k.startswith(("loss_", "lr_")) for k in logged), logged
    assert all(math.isfinite(v) for v in logged.values()), logged
    assert "loss_total" in logged
    after = m.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "one training step changed no parameter"
