"""SMAF: fusion, denoising, reactivation and the consistency loss on hand-worked tensors; the frozen
teacher and the student initialised from it; ablations; a real teacher -> student engine run."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch

from wsss.engine import TrainConfig, build_optimizer, save_model, train_step
from wsss.methods import build_method, required_files
from wsss.methods import smaf as S
from wsss.methods.base import StepContext
from wsss.models import build_backbone

CTX = StepContext(step=0, max_step=10, epoch=0, max_epoch=1, device=torch.device("cpu"))
TEACHER_CFG = {
    "method": "cam",
    "method_options": {},
    "backbone": "resnet18",
    "pretrained": "none",
    "backbone_options": {"freeze_bn": True, "trainable_from": None},
}


pytestmark = pytest.mark.usefixtures("single_thread")


def _backbone(name="resnet18"):
    return build_backbone(name, pretrained="none", freeze_bn=True, trainable_from=None)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(7)
    teacher = build_method("cam", num_classes=3, backbone=_backbone())
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    save_model(path, teacher, {"classifier": TEACHER_CFG})
    return path


def _smaf(teacher_file, **options):
    torch.manual_seed(0)
    return build_method("smaf", num_classes=3, backbone=_backbone(), teacher_path=str(teacher_file), **options)


def _batch(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[:b]
    return {"image": torch.randn(b, 3, size, size, generator=g), "label": y}


# ----------------------------------------------------------------------------------------------
# pure pieces
# ----------------------------------------------------------------------------------------------


def test_fuse_multiscale_sums_scales_and_undoes_the_flip():
    ramp = torch.arange(16.0).reshape(1, 1, 4, 4)
    ident = lambda x: x  # noqa: E731 - the "CAM" is the image itself
    torch.testing.assert_close(S.fuse_multiscale(ident, ramp, [1.0], True, (4, 4)), 2 * ramp)
    torch.testing.assert_close(S.fuse_multiscale(ident, ramp, [1.0], False, (4, 4)), ramp)
    const = torch.full((2, 1, 8, 8), 3.0)
    fused = S.fuse_multiscale(ident, const, [0.5, 1.0, 1.5, 2.0], True, (4, 4))
    torch.testing.assert_close(fused, torch.full((2, 1, 4, 4), 3.0 * 8), rtol=1e-4, atol=1e-4)
    # per-image chunks give the same result
    x = torch.randn(3, 2, 8, 8)
    torch.testing.assert_close(
        S.fuse_multiscale(ident, x, [0.5, 1.0], True, (4, 4), chunk=2),
        S.fuse_multiscale(ident, x, [0.5, 1.0], True, (4, 4)),
    )


def test_rescale_sizes_are_rounded():
    assert S.rescale_images(torch.zeros(1, 3, 33, 21), 1.5).shape[-2:] == (50, 32)
    assert S.rescale_images(torch.zeros(1, 3, 33, 21), 0.5).shape[-2:] == (16, 10)


def test_denoise_and_normalise_hand_values():
    fused = torch.tensor([[[[2.0, 4.0]], [[1.0, 1.0]]]])  # 1 x 2 classes x 1 x 2
    f = S.denoise_and_normalise(fused, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(f, torch.tensor([[[[2 / (4 + 1e-5), 4 / (4 + 1e-5)]], [[0.0, 0.0]]]]))


def test_reactivation_hand_values():
    # pixel 0: (0.1, 0.05) below thr 0.2 -> divided by 0.2; pixel 1: (0.5, 0.0) -> divided by 0.5
    f = torch.tensor([[[[0.1, 0.5]], [[0.05, 0.0]]]])
    r = S.reactivate(f, 0.2)
    torch.testing.assert_close(r, torch.tensor([[[[0.5, 1.0]], [[0.25, 0.0]]]]))


def test_student_maps_and_mac_loss_hand_values():
    cams = torch.tensor([[[[-1.0, 2.0]], [[4.0, 1.0]]]], requires_grad=True)
    m = S.student_maps(cams, (1, 2))
    torch.testing.assert_close(m, torch.tensor([[[[0.0, 2 / (2 + 1e-5)]], [[4 / (4 + 1e-5), 1 / (4 + 1e-5)]]]]))
    student = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])
    target = torch.tensor([[[[0.5, 0.5]], [[0.0, 0.0]]]])
    # class 1 is absent: only class 0 counts, divided by all 4 elements
    assert S.mac_loss(student, target, torch.tensor([[1.0, 0.0]])).item() == pytest.approx((0.25 + 0.25) / 4)
    assert S.mac_loss(student, target, torch.tensor([[1.0, 1.0]])).item() == pytest.approx((0.25 + 0.25 + 1 + 1) / 4)
    S.mac_loss(m, target, torch.tensor([[1.0, 1.0]])).backward()
    assert cams.grad is not None and torch.isfinite(cams.grad).all()


def test_iteration_helper_and_required_files():
    assert S.epochs_for_iterations(20000, 10582, 8) == 15  # official 20k iterations at batch 8
    assert required_files({"classifier": {"method": "cam"}}) == []
    assert required_files({"method": "smaf", "method_options": {"teacher_path": "r/x/classifier/model.pt"}}) == [
        "r/x/classifier/model.pt"
    ]
    assert S.SMAFMethod.required_files({"teacher_path": "r/x/classifier/model.pt"}) == ["r/x/classifier/model.pt"]
    with pytest.raises(ValueError, match="teacher_path"):
        required_files({"classifier": {"method": "smaf", "method_options": {}}})


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------


def test_student_starts_from_the_teacher_and_teacher_is_not_saved(teacher_file):
    from wsss.engine import load_model_state

    m = _smaf(teacher_file)
    src = load_model_state(teacher_file)["model"]
    for k, v in m.student.state_dict().items():
        torch.testing.assert_close(v, src[k])
    assert all(k.startswith("student.") for k in m.state_dict())
    assert m.teacher_config["method"] == "cam" and m.output_stride == 16


def test_option_errors(teacher_file, tmp_path):
    with pytest.raises(TypeError):
        _smaf(teacher_file, no_such_option=1)
    with pytest.raises(ValueError, match="teacher_path"):
        build_method("smaf", num_classes=3, backbone=_backbone())
    with pytest.raises(FileNotFoundError):
        _smaf(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="trained with method"):
        _smaf(teacher_file, teacher_config=dict(TEACHER_CFG, method="acr"))
    with pytest.raises(ValueError, match="does not fit the teacher"):
        build_method("smaf", num_classes=3, backbone=_backbone("resnet50"), teacher_path=str(teacher_file))
    with pytest.raises(ValueError, match="scales"):
        _smaf(teacher_file, scales=[])


def test_step_updates_the_student_only_and_target_matches_the_teacher(teacher_file):
    m = _smaf(teacher_file).train()
    b = _batch()
    teacher = m.teacher(torch.device("cpu"))
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in m.student.state_dict().items()}
    opt = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False))
    out = train_step(m, b, CTX, opt, torch.amp.GradScaler("cuda", enabled=False), use_amp=False)
    assert set(out) == {"loss_mac", "loss_cls", "loss_total"} and all(math.isfinite(v) for v in out.values())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(v, m.student.state_dict()[k]) for k, v in s0.items())
    # the target: teacher CAMs at 0.5/1/1.5/2 + flips, label-masked, max-normalised, reactivated
    with torch.no_grad():
        fused = S.fuse_multiscale(teacher.cam, b["image"], S.SCALES, True, (8, 8))
        expected = S.reactivate(S.denoise_and_normalise(fused, b["label"]), 0.2)
        target = m.target(b["image"], b["label"], (8, 8))
    torch.testing.assert_close(target, expected)
    assert torch.all(target[0, 1] == 0) and torch.all(target[1, [0, 2]] == 0)  # absent classes
    # reactivation: a pixel's strongest class becomes 1 where the fused map reaches thr, else max/thr
    mf = S.denoise_and_normalise(fused, b["label"]).max(1).values
    torch.testing.assert_close(target.max(1).values, torch.where(mf >= 0.2, torch.ones_like(mf), mf / 0.2))


def test_forward_backward_64px(teacher_file):
    m = _smaf(teacher_file).train()
    terms = m.losses(_batch(b=2, size=64), CTX)
    sum(terms.values()).backward()
    g = m.student.backbone.layer4[1].conv2.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert m.cam(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 4, 4)


class _RandomSet(torch.utils.data.Dataset):
    def __init__(self, n=4, size=32):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).repeat(n // 2, 1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "index": i}


def test_resume_is_refused_when_the_teacher_file_changed(teacher_file, tmp_path):
    import shutil

    from wsss.engine import load_checkpoint, train

    teacher = tmp_path / "teacher.pt"
    shutil.copy(teacher_file, teacher)
    cfg = TrainConfig(epochs=2, batch_size=2, lr=0.01, seed=0, amp=False)
    resolved = {"classifier": {"method": "smaf", "method_options": {"teacher_path": str(teacher)}}}
    opts = {"scales": [1.0], "flip": False}
    train(
        _smaf(teacher, **opts),
        _RandomSet(),
        cfg,
        tmp_path / "model.pt",
        tmp_path,
        resolved_config=resolved,
        progress=False,
        stop_after_epochs=1,
    )
    assert load_checkpoint(tmp_path / "last.pt")["method_extra"]["teacher_sha256"]
    torch.manual_seed(99)  # the teacher is retrained: same path, other weights
    save_model(teacher, build_method("cam", num_classes=3, backbone=_backbone()), {"classifier": TEACHER_CFG})
    with pytest.raises(RuntimeError, match="another teacher"):
        train(
            _smaf(teacher, **opts),
            _RandomSet(),
            cfg,
            tmp_path / "model.pt",
            tmp_path,
            resolved_config=resolved,
            progress=False,
        )


ABLATIONS = [
    {"scales": [0.5, 1.0]},  # Table 3: small-scale
    {"scales": [1.0, 1.5]},  # large-scale 1
    {"scales": [1.0, 2.0]},  # large-scale 2
    {"scales": [0.5]},  # Table 4: single scales
    {"scales": [1.0]},
    {"scales": [1.5]},
    {"scales": [2.0]},
    {"reactivation": False},  # Table 5
    {"cls_weight": 0.0},  # the official code's loss
    {"flip": False, "teacher_batch": 1, "target_stride": 8},
]


@pytest.mark.parametrize("opts", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_ablation_runs_one_step(opts, teacher_file):
    m = _smaf(teacher_file, **opts).train()
    opt = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False))
    out = train_step(m, _batch(), CTX, opt, torch.amp.GradScaler("cuda", enabled=False), use_amp=False)
    assert all(math.isfinite(v) for v in out.values())
    assert ("loss_cls" in out) == (opts.get("cls_weight", 1.0) > 0)


def test_teacher_then_student_through_the_engine(tiny_cfg, tmp_path):
    from wsss.data import open_dataset
    from wsss.data.base import write_labels_csv
    from wsss.pipeline import load_classifier, train_classifier

    ds = open_dataset(tiny_cfg)
    ids = ds.ids("train_aug")
    labels_csv = tmp_path / "labels.csv"
    write_labels_csv(labels_csv, ids, {i: ds.labels(i) for i in ids}, ds.class_names)
    teacher_cfg = copy.deepcopy(tiny_cfg)
    teacher_cfg["classifier"]["epochs"] = 1
    teacher = train_classifier(
        teacher_cfg, str(labels_csv), str(tmp_path / "Y" / "model.pt"), str(tmp_path / "Y" / "work"), progress=False
    )

    cfg = copy.deepcopy(tiny_cfg)
    cfg["classifier"].update(
        method="smaf", method_options={"teacher_path": str(teacher), "scales": [0.5, 1.0, 1.5]}, batch_size=8
    )
    assert required_files(cfg) == [str(teacher)]
    model = train_classifier(
        cfg, str(labels_csv), str(tmp_path / "X" / "model.pt"), str(tmp_path / "X" / "work"), progress=False
    )
    with open(tmp_path / "X" / "work" / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * (len(ids) // 8) and {"loss_mac", "loss_cls"} <= set(rows[0])
    assert all(math.isfinite(float(r["loss_total"])) for r in rows)
    m = load_classifier(cfg, str(model), ds.num_fg_classes).eval()
    assert m.cam(torch.zeros(1, 3, 64, 64)).shape == (1, ds.num_fg_classes, 4, 4)
