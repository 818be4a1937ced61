"""Formula-driven pretraining (wsss.pretrain): the image generator, the training stage and
``pretrained: procedural``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss.config import ConfigError, validate_config
from wsss.pretrain import PROCEDURAL_DIR, base_arch, weights_inputs, weights_path
from wsss.pretrain.procedural import Category, make_categories, outline, render_image
from wsss.pretrain.train import ProceduralSet, pretrain


def test_categories_are_a_function_of_seed_and_count():
    a, b = make_categories(16, seed=3), make_categories(16, seed=3)
    assert a == b and len(a) == 16
    assert make_categories(16, seed=4) != a
    assert len({(c.m, round(c.n1, 6), c.texture) for c in a}) == 16  # no two categories alike
    with pytest.raises(ValueError, match="num_categories"):
        make_categories(1, 0)


def test_outline_is_a_closed_curve_inside_radius_one_half():
    for cat in make_categories(32, 0):
        pts = outline(cat, n=64)
        r = np.hypot(pts[:, 0], pts[:, 1])
        assert pts.shape == (64, 2)
        assert r.max() == pytest.approx(0.5)  # scaled to radius 0.5
        assert r.min() >= 0.15 * 0.5 - 1e-9  # no spike through the centre


def test_superformula_circle_and_square():
    """m = 0 (or n2 = n3 with any m and n1 large) is a circle; m = 4, n1 = n2 = n3 = 1 is Gielis'
    square with its corners on the axes."""
    circle = Category(0, 1.0, 1.0, 1.0, (), (), "grating", (2.0, 2.0), (0.0, 0.0))
    r = np.hypot(*outline(circle, 32).T)
    np.testing.assert_allclose(r, 0.5)
    square = Category(4, 1.0, 1.0, 1.0, (), (), "grating", (2.0, 2.0), (0.0, 0.0))
    pts = outline(square, 8)  # angles 0, 45, 90, ... degrees
    r = np.hypot(*pts.T)
    # r(t) = 1 / (|cos t| + |sin t|): 1 on the axes, 1/sqrt(2) on the diagonals (a square rotated 45 deg)
    np.testing.assert_allclose(r[::2], 0.5)
    np.testing.assert_allclose(r[1::2], 0.5 / math.sqrt(2))


def test_images_are_deterministic_and_labelled():
    cats = make_categories(8, 0)
    img, labels = render_image(5, 0, cats, 64)
    img2, labels2 = render_image(5, 0, cats, 64)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert np.array_equal(img, img2) and np.array_equal(labels, labels2)
    other, _ = render_image(6, 0, cats, 64)
    assert not np.array_equal(img, other)
    counts = []
    for i in range(40):
        _, lab = render_image(i, 1, cats, 48, max_objects=3)
        assert 1 <= len(lab) <= 3 and list(lab) == sorted(set(lab.tolist()))
        assert lab.min() >= 0 and lab.max() < 8
        counts.append(len(lab))
    assert set(counts) >= {1, 2}  # several objects per image occur


def test_a_labelled_category_is_visible_where_its_shape_is():
    """With one object per image, the pixels inside the drawn shape differ from the background
    that the same image would have without it (the label is never given for a hidden object)."""
    cats = make_categories(4, 0)
    img, labels = render_image(0, 7, cats, 96, max_objects=1)
    assert len(labels) == 1
    # re-render the same random stream without objects: the background is drawn first
    from wsss.pretrain import procedural

    rng = np.random.default_rng(np.random.SeedSequence([7, 0]))
    bg = procedural.background(rng, 96, 96)
    diff = np.abs(img.astype(np.float32) - bg).mean(-1)
    changed = diff > 12  # well above the sensor noise (std 4)
    assert changed.mean() > 0.01  # at least the 1 % of the image an object must cover
    # the changed pixels form one region whose extent is that of an object (not the whole image)
    assert changed.mean() < 0.9


def test_procedural_set_samples():
    ds = ProceduralSet(images_per_epoch=6, image_size=40, num_categories=5, seed=0)
    s = ds[2]
    assert s["image"].shape == (3, 40, 40) and s["image"].dtype == torch.float32
    assert s["label"].shape == (5,) and s["label"].sum() >= 1
    assert abs(float(s["image"].mean())) < 3  # normalised
    again = ds[2]
    assert torch.equal(s["image"], again["image"])
    ds.set_epoch(1)  # a new epoch shows new images
    assert not torch.equal(ds[2]["image"], s["image"])


def test_weights_path_and_inputs():
    assert base_arch("resnet50_os8") == "resnet50" and base_arch("resnet38") == "resnet38"
    assert str(weights_path("resnet18_os8")) == f"{PROCEDURAL_DIR}/resnet18/model.pt"
    assert weights_inputs("procedural", "resnet18") == [f"{PROCEDURAL_DIR}/resnet18/model.pt"]
    assert weights_inputs("none", "resnet18") == [] and weights_inputs("classifier", "resnet18") == []


def test_config_accepts_procedural_and_validates_the_section():
    cfg = validate_config({"classifier": {"pretrained": "procedural"}, "deeplab": {"pretrained": "procedural"}})
    assert cfg["pretrain"]["num_categories"] >= 2
    with pytest.raises(ConfigError, match="pretrain"):
        validate_config({"pretrain": {"epochs": 0}})
    with pytest.raises(ConfigError, match="procedural"):
        validate_config({"classifier": {"pretrained": "procedual"}})


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    work = tmp_path_factory.mktemp("pretrain")
    params = dict(
        validate_config({})["pretrain"], backbone="resnet18", images_per_epoch=8, image_size=32, batch_size=4, epochs=2
    )
    out = work / PROCEDURAL_DIR / "resnet18" / "model.pt"
    out.parent.mkdir(parents=True)
    pretrain(params, str(out), str(work / "w"), progress=False, log_out=str(work / "log.csv"))
    return work, params


def test_pretrain_writes_a_model_file_with_config_and_log(tiny_pretrained):
    from wsss import __version__
    from wsss.engine import load_model_state

    work, params = tiny_pretrained
    state = load_model_state(work / PROCEDURAL_DIR / "resnet18" / "model.pt")
    assert state["config"]["backbone"] == "resnet18" and state["config"]["generator_version"] >= 1
    assert state["package_version"] == __version__
    assert state["model"]["classifier.weight"].shape[0] == params["num_categories"]
    log = (work / "log.csv").read_text().splitlines()
    assert log[0].startswith("step") and len(log) == 1 + 2 * 2  # 2 epochs x 2 steps


def test_pretrained_procedural_loads_the_backbone(tiny_pretrained, monkeypatch):
    from wsss.engine import load_model_state
    from wsss.models import build_backbone

    work, _ = tiny_pretrained
    monkeypatch.chdir(work)
    state = load_model_state(weights_path("resnet18"))["model"]
    for arch in ("resnet18", "resnet18_os8"):  # the dilated variant loads the same weights
        bb = build_backbone(arch, pretrained="procedural")
        own = bb.state_dict()
        key = next(k for k in own if k.endswith("conv1.weight"))
        assert torch.equal(own[key], state["backbone." + key])
    monkeypatch.chdir(work / "w")
    with pytest.raises(FileNotFoundError, match="results/pretrain/resnet18/model.pt"):
        build_backbone("resnet18", pretrained="procedural")
