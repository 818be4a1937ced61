"""EPS (wsss.methods.eps), the saliency input stage (synthetic SALImages/, the classification
dataset, the workflow inputs) and SMAF on an EPS teacher (``student_loss``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.data.classification import ClassificationTrainSet, read_saliency
from wsss.data.synthetic import generate_synthetic, image_ids, resolve_params, saliency_map
from wsss.data.transforms import TrainTransform
from wsss.data.voc import VOCDataset
from wsss.engine import TrainConfig, build_optimizer, save_model, train_step
from wsss.io import DataError
from wsss.methods import build_method, needs_saliency
from wsss.methods.base import StepContext
from wsss.methods.eps import EPSMethod, eps_saliency_estimate, eps_saliency_loss
from wsss.methods.smaf import reactivate_with_background, softmax_student_loss
from wsss.models import build_backbone

CTX = StepContext(step=0, max_step=10, epoch=0, max_epoch=2, device=torch.device("cpu"))

pytestmark = pytest.mark.usefixtures("single_thread")


def _backbone():
    return build_backbone("resnet18", pretrained="none", freeze_bn=True, trainable_from=None)


# --------------------------------------------------------------------------------------------
# the saliency loss, by hand


def test_saliency_loss_hand_computed():
    """One image, C = 2 (both present), a 1 x 2 CAM; tau 0.4, lam 0.5."""
    # pixel 0: logits (fg0, fg1, bg) = (2, 0, 0); pixel 1: (0, 0, 2)
    cam = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]], [[0.0, 2.0]]]])
    sal = torch.tensor([[[[1.0, 0.0]]]])
    labels = torch.tensor([[1.0, 1.0]])
    e2 = math.exp(2.0)
    p_hi, p_lo = e2 / (e2 + 2), 1 / (e2 + 2)  # softmax of (2, 0, 0)
    # class 0: round(P_0) = (1, 0), overlap with round(S) = (1, 0): 1 / (1 + 2e-4) > 0.4 -> foreground
    # class 1: round(P_1) = (0, 0): overlap 0 -> its map joins the background
    fg = [p_hi, p_lo]  # P_0
    bg = [p_lo + p_lo, p_hi + p_lo]  # P_bg + P_1
    est = [0.5 * f + 0.5 * (1 - b) for f, b in zip(fg, bg)]
    expected = ((est[0] - 1.0) ** 2 + (est[1] - 0.0) ** 2) / 2
    got = eps_saliency_loss(cam, sal, labels, tau=0.4, lam=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    _, valid = eps_saliency_estimate(cam, sal, labels, 0.4, 0.5)
    assert valid.tolist() == [[True, False]]
    # an absent class enters neither sum; tau above the overlap sends class 0 to the background too
    got_absent = eps_saliency_loss(cam, sal, torch.tensor([[1.0, 0.0]]), tau=0.4, lam=0.5)
    est_absent = [0.5 * f + 0.5 * (1 - b) for f, b in zip(fg, [p_lo, p_hi])]
    assert got_absent.item() == pytest.approx(((est_absent[0] - 1) ** 2 + est_absent[1] ** 2) / 2, rel=1e-6)
    got_tau = eps_saliency_loss(cam, sal, labels, tau=0.9999, lam=0.5)
    est_tau = [0.5 * (1 - (p_lo + p_hi + p_lo)), 0.5 * (1 - (p_hi + p_lo + p_lo))]
    assert got_tau.item() == pytest.approx(((est_tau[0] - 1) ** 2 + est_tau[1] ** 2) / 2, rel=1e-6)


def test_saliency_is_resized_nearest_to_the_cam():
    cam = torch.zeros(1, 3, 2, 2)
    sal = torch.zeros(1, 1, 4, 4)
    sal[..., :2, :2] = 1.0
    # uniform softmax 1/3: estimate = 0.5 * 0 + 0.5 * (1 - 1/3 - 1/3 - 1/3) = 0 with both classes
    # to the background (no round(P) = 1 anywhere) -> loss = mean(S_nearest^2) = 1/4
    loss = eps_saliency_loss(cam, sal, torch.tensor([[1.0, 1.0]]))
    assert loss.item() == pytest.approx(0.25, abs=1e-6)


# --------------------------------------------------------------------------------------------
# the method


def test_eps_outputs_and_training_steps():
    torch.manual_seed(0)
    m = build_method("eps", num_classes=3, backbone=_backbone())
    assert isinstance(m, EPSMethod) and m.needs_saliency
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        full = m.full_cam(x)
        assert full.shape[1] == 4 and m.background_channel == 3
        cams = m.cam(x)
        assert torch.allclose(cams, F.softmax(full, dim=1)[:, :3])
        assert torch.allclose(m.logits(x), full.mean(dim=(2, 3))[:, :3])
    assert m.cam_upsample == "raw_then_relu"
    batch = {"image": x, "label": torch.tensor([[1.0, 0, 1], [0, 1, 0]]), "saliency": torch.rand(2, 1, 32, 32)}
    m.train()
    opt = build_optimizer(m.param_groups(), TrainConfig(lr=0.01, amp=False))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for step in range(3):
        logged = train_step(m, batch, StepContext(step, 10, 0, 1, torch.device("cpu")), opt, scaler, use_amp=False)
        assert {"loss_cls", "loss_sal", "loss_total"} <= set(logged)
        assert all(math.isfinite(v) for v in logged.values())
    with pytest.raises(KeyError, match="saliency"):
        m.losses({"image": x, "label": batch["label"]}, CTX)


def test_eps_smaf_projection_head_and_options():
    m = build_method("eps", num_classes=3, backbone=_backbone(), projection_channels=8)
    assert m.classifier.in_channels == 8 and not m.projection_bn.training
    m.train()
    assert not m.projection_bn.training  # frozen, as every BatchNorm of SMAF's EPS
    with pytest.raises(ValueError, match="lam"):
        build_method("eps", num_classes=3, backbone=_backbone(), lam=2.0)
    with pytest.raises(TypeError):
        build_method("eps", num_classes=3, backbone=_backbone(), unknown=1)
    assert needs_saliency({"classifier": {"method": "eps"}})
    assert not needs_saliency({"classifier": {"method": "cam"}})
    assert not needs_saliency({"classifier": {"method": "smaf"}})


# --------------------------------------------------------------------------------------------
# synthetic saliency maps and the dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "tiny"
    generate_synthetic(root, preset="tiny", seed=0, progress=False)
    return root


def test_synthetic_saliency_deterministic_and_imperfect(tiny):
    params = resolve_params("tiny")
    ids = image_ids(params)["all"]
    corr, diffs = [], []
    for index, image_id in enumerate(ids):
        sal = read_saliency(tiny / "SALImages" / f"{image_id}.png")
        label = np.asarray(Image.open(tiny / "SegmentationClassAug" / f"{image_id}.png"))
        assert sal.shape == label.shape and sal.dtype == np.uint8
        assert np.array_equal(sal, saliency_map(label, 0, index))  # deterministic from (seed, index)
        fg = ((label > 0) & (label < 255)).astype(np.float64)
        s = sal.astype(np.float64) / 255
        assert not np.array_equal(s > 0.5, fg > 0.5)
        corr.append(np.corrcoef(s.ravel(), fg.ravel())[0, 1])
        diffs.append(np.abs(s - fg).mean())
    assert np.mean(corr) > 0.5  # correlates with the foreground ...
    assert np.mean(diffs) > 0.02  # ... but is no copy of it
    assert not np.array_equal(saliency_map(label, 1, index), saliency_map(label, 0, index))


def test_old_synthetic_dataset_gets_its_saliency_maps(tiny, tmp_path):
    """A dataset generated before SALImages/ existed gets the same maps when asked again."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny, root)
    shutil.rmtree(root / "SALImages")
    stats = generate_synthetic(root, preset="tiny", seed=0, progress=False)
    assert stats["generated"] is False
    for p in (tiny / "SALImages").iterdir():
        assert (root / "SALImages" / p.name).read_bytes() == p.read_bytes()


def test_dataset_loads_saliency_with_the_image_geometry(tiny):
    ds = VOCDataset(tiny)
    ids = ds.ids("train_aug")[:3]
    labels = {i: ds.labels(i) for i in ids}
    tf = TrainTransform(resize_long=(40, 60), crop_size=48)
    plain = ClassificationTrainSet(ds, ids, labels, tf, seed=1)
    with_sal = ClassificationTrainSet(ds, ids, labels, tf, seed=1, saliency_dir=tiny / "SALImages")
    for k in range(3):
        a, b = plain[k], with_sal[k]
        assert "saliency" not in a
        assert torch.equal(a["image"], b["image"])  # same random draws with and without saliency
        s = b["saliency"]
        assert s.shape == (1, 48, 48) and s.dtype == torch.float32 and 0 <= s.min() and s.max() <= 1
    # the saliency map follows the image: use the image itself as its "saliency map" (grey)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    grey = np.repeat(img[..., :1], 3, axis=2)
    for seed in range(4):
        x, s = tf.with_saliency(grey, grey[..., 0], np.random.default_rng(seed))
        x_only = tf(grey, np.random.default_rng(seed))
        assert np.array_equal(x, x_only)
        # de-normalise the red channel and compare (zero padding: saliency 0, image 0 = mean)
        red = x[0] * 0.229 + 0.485
        inside = np.abs(x).sum(0) > 0
        assert np.allclose(red[inside], s[0][inside], atol=1e-5)


def test_missing_saliency_file_names_it(tiny, tmp_path):
    ds = VOCDataset(tiny)
    ids = ds.ids("train_aug")[:1]
    empty = tmp_path / "sal"
    empty.mkdir()
    train_set = ClassificationTrainSet(ds, ids, {ids[0]: ds.labels(ids[0])}, TrainTransform(), saliency_dir=empty)
    with pytest.raises(DataError, match=f"saliency map not found: {empty / ids[0]}.png"):
        train_set[0]


def test_workflow_inputs_of_a_saliency_method(tmp_path):
    from wsss.config import run_config, saliency_dir, validate_config
    from wsss.pipeline import classifier_inputs

    cfg = validate_config({"experiments": {"e": {"classifier": {"method": "eps"}}, "c": {}}})
    e, c = run_config(cfg, "e/s0"), run_config(cfg, "c/s0")
    assert classifier_inputs(c) == []
    assert classifier_inputs(e) == ["data/synthetic/.complete"] or classifier_inputs(e)[0].endswith(".complete")
    assert saliency_dir(e) == saliency_dir(c) and str(saliency_dir(e)).endswith("SALImages")
    given = validate_config({"experiments": {"e": {"classifier": {"method": "eps"}}}, "saliency": {"root": "my/sal"}})
    assert classifier_inputs(run_config(given, "e/s0")) == ["my/sal"]
    voc = validate_config({"dataset": {"name": "voc12"}, "experiments": {"e": {"classifier": {"method": "eps"}}}})
    assert classifier_inputs(run_config(voc, "e/s0")) == ["data/voc12/VOCdevkit/VOC2012/.voc12_saliency.complete"]


# --------------------------------------------------------------------------------------------
# SMAF on an EPS teacher


def test_smaf_softmax_student_loss_by_hand():
    # target: one pixel, C = 1 present, fused foreground 0.5 -> with bg 0.2: (0.5, 0.2) / 0.5 = (1, 0.4)
    fused = torch.tensor([[[[0.5]]]])
    target = reactivate_with_background(fused, 0.2, -1)
    assert torch.allclose(target, torch.tensor([[[[1.0]], [[0.4]]]]))
    # the student's raw 2-channel map (1 x 1): logits (1, 0) -> softmax (e/(e+1), 1/(e+1))
    full = torch.tensor([[[[1.0]], [[0.0]]]])
    p = math.e / (math.e + 1)
    expected = ((p - 1.0) ** 2 + ((1 - p) - 0.4) ** 2) / 2
    assert softmax_student_loss(full, target).item() == pytest.approx(expected, rel=1e-6)
    # background first (bg_index 0) and no reactivation: plain concatenation
    assert torch.allclose(
        reactivate_with_background(fused, 0.2, 0, reactivation=False), torch.tensor([[[[0.2]], [[0.5]]]])
    )


def test_smaf_on_an_eps_teacher(tmp_path):
    torch.manual_seed(3)
    teacher_cfg = {
        "method": "eps",
        "method_options": {},
        "backbone": "resnet18",
        "pretrained": "none",
        "backbone_options": {"freeze_bn": True, "trainable_from": None},
    }
    path = tmp_path / "model.pt"
    save_model(path, build_method("eps", num_classes=3, backbone=_backbone()), {"classifier": teacher_cfg})
    smaf = build_method("smaf", num_classes=3, backbone=_backbone(), teacher_path=str(path), scales=[1.0])
    assert smaf.student_loss == "softmax_bg" and not smaf.needs_saliency
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([[1.0, 0, 0], [0, 1, 1]])}
    target = smaf.target(batch["image"], batch["label"], (8, 8))
    assert target.shape == (2, 4, 8, 8)
    assert torch.allclose(target.max(dim=1).values, torch.ones(2, 8, 8))  # reactivated: arg-max channel is 1
    assert (target[0, 1:3] == 0).all() and (target[1, 0] == 0).all()  # absent classes are 0
    terms = smaf.losses(batch, CTX)
    assert set(terms) == {"mac", "cls"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    manual = 100 * softmax_student_loss(smaf.student.full_cam(batch["image"]), target)
    assert terms["mac"].item() == pytest.approx(manual.item(), rel=1e-5)
    old = build_method("smaf", num_classes=3, backbone=_backbone(), teacher_path=str(path), student_loss="relu_fg")
    assert old.student_loss == "relu_fg" and old.target(batch["image"], batch["label"], (8, 8)).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="student_loss"):
        build_method("smaf", num_classes=3, backbone=_backbone(), teacher_path=str(path), student_loss="x")
