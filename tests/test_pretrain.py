"""Formula-driven pretraining (wsss.pretrain): the image generator, the training stage and
``pretrained: procedural``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss.config import ConfigError, validate_config
from wsss.pretrain import PROCEDURAL_DIR, base_arch, weights_inputs, weights_path
from wsss.pretrain.procedural import TEXTURE_KINDS, Shape, make_categories, outline, render_image, visible_labels
from wsss.pretrain.train import ProceduralSet, pretrain


def test_categories_are_a_function_of_seed_and_counts():
    a, b = make_categories(6, 9, seed=3), make_categories(6, 9, seed=3)
    assert a == b and len(a.shapes) == 6 and len(a.textures) == 9 and a.num_labels == 15
    assert make_categories(6, 9, seed=4) != a
    assert {t.kind for t in make_categories(2, len(TEXTURE_KINDS), 0).textures} == set(TEXTURE_KINDS)
    # two families of one kind differ in frequency
    tex = make_categories(1, 2 * len(TEXTURE_KINDS), 0).textures
    for kind in TEXTURE_KINDS:
        f = sorted(t.freq for t in tex if t.kind == kind)
        assert len(f) == 2 and f[1] > 1.3 * f[0], kind
    with pytest.raises(ValueError, match="at least one shape and one texture"):
        make_categories(0, 3, 0)


def test_outline_is_a_closed_curve_inside_radius_one_half():
    for shape in make_categories(32, 1, 0).shapes:
        pts = outline(shape, n=64)
        r = np.hypot(pts[:, 0], pts[:, 1])
        assert pts.shape == (64, 2)
        assert r.max() == pytest.approx(0.5)  # scaled to radius 0.5
        assert r.min() >= 0.15 * 0.5 - 1e-9  # no spike through the centre


def test_superformula_circle_and_square():
    """m = 0 is a circle; m = 4, n1 = n2 = n3 = 1 is Gielis' square with its corners on the axes."""
    r = np.hypot(*outline(Shape(0, 1.0, 1.0, 1.0, (), ()), 32).T)
    np.testing.assert_allclose(r, 0.5)
    r = np.hypot(*outline(Shape(4, 1.0, 1.0, 1.0, (), ()), 8).T)  # angles 0, 45, 90, ... degrees
    # r(t) = 1 / (|cos t| + |sin t|): 1 on the axes, 1/sqrt(2) on the diagonals
    np.testing.assert_allclose(r[::2], 0.5)
    np.testing.assert_allclose(r[1::2], 0.5 / math.sqrt(2))


def test_images_are_deterministic_and_labelled():
    cats = make_categories(4, 5, 0)
    img, labels = render_image(5, 0, cats, 64)
    img2, labels2 = render_image(5, 0, cats, 64)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert np.array_equal(img, img2) and np.array_equal(labels, labels2)
    other, _ = render_image(6, 0, cats, 64)
    assert not np.array_equal(img, other)
    objects = []
    for i in range(40):
        _, lab = render_image(i, 1, cats, 48, max_objects=3)
        assert list(lab) == sorted(set(lab.tolist())) and lab.min() >= 0 and lab.max() < 9
        shapes, textures = lab[lab < 4], lab[lab >= 4]
        assert 1 <= len(shapes) <= 3 and 1 <= len(textures) <= 3  # every object: a shape and a texture
        objects.append(max(len(shapes), len(textures)))
    assert set(objects) >= {1, 2}  # several objects per image occur


def test_an_object_is_labelled_where_it_is_visible():
    """With one object, the pixels inside it differ from the background the same image would have
    without it; an object hidden behind a later one is not labelled."""
    from wsss.pretrain import procedural

    cats = make_categories(3, 3, 0)
    img, labels = render_image(0, 7, cats, 96, max_objects=1)
    assert len(labels) == 2
    rng = np.random.default_rng(np.random.SeedSequence([7, 0]))  # the background is drawn first
    changed = np.abs(img.astype(np.float32) - procedural.background(rng, 96, 96)).mean(-1) > 12
    assert 0.02 <= changed.mean() < 0.9  # at least the 2 % an object must show, not the whole image
    for i in range(30):  # an object always brings its shape and its texture label
        _, lab = render_image(i, 3, cats, 48, max_objects=3)
        assert (lab < 3).any() and (lab >= 3).any()


def test_hidden_objects_are_not_labelled():
    a = np.zeros((10, 10), np.float32)
    a[:5] = 1  # first object: top half
    b = np.zeros_like(a)
    b[:4] = 1  # second object drawn over 4 of its 5 rows
    assert visible_labels([(a, (0, 5)), (b, (1, 6))]) == {0, 1, 5, 6}  # 10 % of a still shows
    assert visible_labels([(a, (0, 5)), (b, (1, 6))], min_fraction=0.2) == {1, 6}
    full = np.ones_like(a)
    assert visible_labels([(a, (0, 5)), (full, (2, 7))]) == {2, 7}  # a entirely covered
    assert visible_labels([]) == set()


def test_procedural_set_samples():
    ds = ProceduralSet(images_per_epoch=6, image_size=40, num_shapes=3, num_textures=2, seed=0)
    s = ds[2]
    assert s["image"].shape == (3, 40, 40) and s["image"].dtype == torch.float32
    assert s["label"].shape == (5,) and s["label"].sum() >= 2
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
    assert cfg["pretrain"]["num_shapes"] >= 1 and cfg["pretrain"]["num_textures"] >= 1
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
    assert state["model"]["classifier.weight"].shape[0] == params["num_shapes"] + params["num_textures"]
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
