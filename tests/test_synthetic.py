"""The built-in synthetic dataset: VOC layout, determinism, the boat/water bias, GT bands, atomicity."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data.synthetic import (
    MARKER,
    PRESETS,
    SyntheticDatasetError,
    boundary_band,
    class_names_for,
    generate_synthetic,
    main,
    resolve_params,
)
from wsss.data.voc import VOCDataset
from wsss.io import read_label_png, voc_palette


def _hashes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    stats = generate_synthetic(root, preset="tiny", seed=0, progress=False)
    return root, stats


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """200 small images: enough for the co-occurrence and size statistics."""
    root = tmp_path_factory.mktemp("synthetic") / "medium"
    generate_synthetic(
        root,
        preset="tiny",
        seed=3,
        progress=False,
        n_train_aug=160,
        n_train=40,
        n_val=40,
        long_side=[96, 128],
        object_size=[0.08, 0.75],
        min_visible_pixels=8,
    )
    ds = VOCDataset(root)
    meta = json.loads((root / "meta.json").read_text())["images"]
    return root, ds, meta


# --------------------------------------------------------------------------------------------
# Layout and content, read through the VOC reader


def test_tiny_is_read_by_voc_reader(tiny):
    root, stats = tiny
    ds = VOCDataset(root)
    classes = json.loads((root / "classes.json").read_text())
    assert ds.class_names == classes["class_names"] == class_names_for(8)
    assert ds.class_names[0] == "background" and "boat" in ds.class_names
    assert ds.mask_dir.name == "SegmentationClassAug"
    assert ds.splits() == ["train", "train_aug", "trainval", "val"]
    p = PRESETS["tiny"]
    train, train_aug, val, trainval = (ds.ids(s) for s in ("train", "train_aug", "val", "trainval"))
    assert (len(train), len(train_aug), len(val)) == (p["n_train"], p["n_train_aug"], p["n_val"])
    assert train == train_aug[: p["n_train"]]
    assert set(train) <= set(train_aug)
    assert not set(val) & set(train_aug)
    assert trainval == train + val
    assert all(i.startswith("syn_") and len(i) == 10 for i in train_aug + val)
    assert stats["images"] == len(train_aug) + len(val) and stats["generated"] is True

    valid = set(range(ds.num_classes)) | {255}
    for image_id in train_aug + val:
        image = ds.load_image(image_id)
        mask = ds.load_mask(image_id)
        assert image.shape == mask.shape + (3,)
        assert set(np.unique(mask).tolist()) <= valid
        labels = ds.labels(image_id)
        assert labels.sum() >= 1, image_id
        np.testing.assert_array_equal(labels, ds.labels_from_xml(image_id), err_msg=image_id)
        with Image.open(ds.image_path(image_id)) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
        with Image.open(ds.mask_path(image_id)) as im:
            assert im.mode == "L"


def test_segmentation_class_is_palette_png_for_trainval_only(tiny):
    root, _ = tiny
    ds = VOCDataset(root)
    trainval = set(ds.ids("trainval"))
    have = {p.stem for p in (root / "SegmentationClass").glob("*.png")}
    assert have == trainval
    pal = voc_palette().reshape(-1).tolist()
    for image_id in sorted(trainval):
        path = root / "SegmentationClass" / f"{image_id}.png"
        with Image.open(path) as im:
            assert im.mode == "P"
            assert im.getpalette()[: len(pal)] == pal
        np.testing.assert_array_equal(read_label_png(path), ds.load_mask(image_id))
    # the reader works with the original-VOC convention too
    voc = VOCDataset(root, mask_dir="SegmentationClass")
    assert voc.labels(ds.ids("val")[0]).sum() >= 1


def test_annotation_xml(tiny):
    root, _ = tiny
    ds = VOCDataset(root)
    meta = {m["id"]: m for m in json.loads((root / "meta.json").read_text())["images"]}
    for image_id in ds.ids("train_aug")[:10]:
        tree = ET.parse(ds.annotation_path(image_id)).getroot()
        assert tree.findtext("filename") == f"{image_id}.jpg"
        h, w = ds.load_mask(image_id).shape
        assert int(tree.findtext("size/width")) == w and int(tree.findtext("size/height")) == h
        objects = tree.findall("object")
        assert len(objects) == len(meta[image_id]["objects"]) >= 1
        for obj in objects:
            assert obj.findtext("name") in ds.class_names[1:]
            assert obj.findtext("difficult") == "0"
            box = [int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            assert 1 <= box[0] <= box[2] <= w and 1 <= box[1] <= box[3] <= h


def test_classes_json_and_marker(tiny):
    root, stats = tiny
    classes = json.loads((root / "classes.json").read_text())
    assert classes["palette"] == voc_palette(9).tolist()
    assert classes["generator"]["params"] == resolve_params("tiny")
    assert classes["generator"]["seed"] == 0
    marker = json.loads((root / MARKER).read_text())
    assert marker["preset"] == "tiny" and marker["params"] == resolve_params("tiny")
    assert marker["counts"]["images"] == stats["images"]
    assert "wsss_version" in marker
    assert not list(root.parent.glob(".tiny.tmp-*"))  # no temporary folder left behind


# --------------------------------------------------------------------------------------------
# Determinism and atomicity


def test_deterministic_and_order_independent(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    generate_synthetic(a, preset="tiny", seed=5, progress=False)
    generate_synthetic(b, preset="tiny", seed=5, workers=2, progress=False)
    ha, hb = _hashes(a), _hashes(b)
    assert ha == hb
    assert any(k.startswith("JPEGImages/") for k in ha)
    c = tmp_path / "c"
    generate_synthetic(c, preset="tiny", seed=6, progress=False)
    assert _hashes(c)["JPEGImages/syn_000001.jpg"] != ha["JPEGImages/syn_000001.jpg"]


def test_complete_root_is_a_noop(tiny):
    root, _ = tiny
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    stats = generate_synthetic(root, preset="tiny", seed=0, progress=False)
    assert stats["generated"] is False and stats["images"] == 36
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_interrupted_generation_is_regenerated(tmp_path):
    ref = tmp_path / "ref"
    generate_synthetic(ref, preset="tiny", progress=False, n_train_aug=6, n_train=2, n_val=2)
    root = tmp_path / "data"
    generate_synthetic(root, preset="tiny", progress=False, n_train_aug=6, n_train=2, n_val=2)
    (root / MARKER).unlink()  # as if interrupted before completion
    (root / "JPEGImages" / "syn_000003.jpg").unlink()
    (root / "JPEGImages" / "junk.jpg").write_bytes(b"partial")
    stats = generate_synthetic(root, preset="tiny", progress=False, n_train_aug=6, n_train=2, n_val=2)
    assert stats["generated"] is True
    assert _hashes(root) == _hashes(ref)


def test_empty_root_is_filled(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()  # Snakemake creates the output's folder before the job runs
    stats = generate_synthetic(root, preset="tiny", progress=False, n_train_aug=4, n_train=2, n_val=2)
    assert stats["generated"] and (root / MARKER).exists()


def test_mismatching_parameters_raise(tmp_path):
    root = tmp_path / "data"
    generate_synthetic(root, preset="tiny", seed=0, progress=False, n_train_aug=4, n_train=2, n_val=2)
    with pytest.raises(SyntheticDatasetError, match="delete"):
        generate_synthetic(root, preset="tiny", seed=1, progress=False, n_train_aug=4, n_train=2, n_val=2)
    with pytest.raises(SyntheticDatasetError, match="n_val"):
        generate_synthetic(root, preset="tiny", seed=0, progress=False, n_train_aug=4, n_train=2, n_val=3)
    assert (root / MARKER).exists()  # left untouched


def test_foreign_folder_is_not_deleted(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(SyntheticDatasetError, match="refusing"):
        generate_synthetic(root, preset="tiny", progress=False)
    assert (root / "thesis.tex").read_text() == "precious"


def test_parameters_are_checked():
    with pytest.raises(TypeError, match="bogus_key"):
        resolve_params("tiny", bogus_key=1)
    with pytest.raises(TypeError, match="bogus_key"):
        generate_synthetic("/nonexistent/never/created", preset="tiny", bogus_key=1)
    with pytest.raises(ValueError, match="n_train"):
        resolve_params("tiny", n_train=100)
    with pytest.raises(ValueError, match="long_side"):
        resolve_params("tiny", long_side=[200, 100])
    with pytest.raises(KeyError, match="tiny"):
        resolve_params("huge")
    assert resolve_params("default", long_side=(100, 120))["long_side"] == [100, 120]
    for preset in PRESETS.values():
        assert set(preset) == set(PRESETS["default"])


def test_default_preset_sizes():
    p = resolve_params("default")
    assert (p["n_train_aug"], p["n_train"], p["n_val"]) == (400, 100, 100)
    assert p["num_classes"] == 8 and p["boundary_width"] == 2 and p["jpeg_quality"] == 90


def test_default_preset_is_the_hard_one_made_learnable():
    """The default (since e0a331a) differs from ``hard`` (the earlier default, on which full
    supervision reached 23.5 mIoU) only in object size, distractor count and hue separation; the
    README's numbers for both depend on exactly these values."""
    d, h = resolve_params("default"), resolve_params("hard")
    assert {k for k in d if d[k] != h[k]} == {"object_size", "distractors", "class_hue_halfwidth"}
    assert (d["object_size"], d["distractors"], d["class_hue_halfwidth"]) == ([0.2, 0.75], [0, 3], 0.05)
    assert (h["object_size"], h["distractors"], h["class_hue_halfwidth"]) == ([0.08, 0.75], [3, 8], 0.2)


def test_every_preset_is_a_valid_config_value():
    """``synthetic.preset`` in the config schema accepts exactly the generator's presets."""
    from wsss.config import load_schema

    enum = load_schema()["properties"]["synthetic"]["properties"]["preset"]["enum"]
    assert sorted(enum) == sorted(PRESETS)


def test_cli(tmp_path, capsys):
    root = tmp_path / "cli"
    rc = main(
        [
            str(root),
            "--preset",
            "tiny",
            "--seed",
            "2",
            "--set",
            "n_train_aug=4",
            "--set",
            "n_train=2",
            "--set",
            "n_val=2",
            "--set",
            "long_side=[48, 56]",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 6
    marker = json.loads((root / MARKER).read_text())
    assert marker["seed"] == 2 and marker["params"]["long_side"] == [48, 56]
    assert main([str(tmp_path / "x"), "--preset", "tiny", "--set", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# What makes the problem weakly supervised and VOC-like


def test_boat_water_cooccurrence(medium):
    _, ds, meta = medium
    assert len(meta) == 200
    boat = [m for m in meta if any(o["class"] == "boat" for o in m["objects"])]
    no_boat = [m for m in meta if m not in boat]
    assert len(boat) >= 20 and len(no_boat) >= 100
    p_boat = np.mean([m["water"] for m in boat])
    p_no_boat = np.mean([m["water"] for m in no_boat])
    assert p_boat >= 0.8, p_boat
    assert p_no_boat <= 0.2, p_no_boat
    # boats in water images sit on the water; water itself is background in the masks
    for m in boat:
        assert all(o["on_water"] == m["water"] for o in m["objects"] if o["class"] == "boat")
    for m in [m for m in boat if m["water"]][:10]:
        mask = ds.load_mask(m["id"])
        bottom = mask[-max(2, mask.shape[0] // 10) :]
        assert (bottom == 0).mean() > 0.3  # the lowest rows are mostly (water =) background


def test_boundary_band(medium):
    _, ds, meta = medium
    for m in meta[:50]:
        mask = ds.load_mask(m["id"])
        assert (mask == 255).any(), m["id"]
        # valid labels never touch a different valid label: a void band separates every boundary
        for a, b in ((mask[:, :-1], mask[:, 1:]), (mask[:-1, :], mask[1:, :])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any(), m["id"]
        # void pixels touch both objects and background, and lie next to an object's visible region
        fg = (mask != 0) & (mask != 255)
        void = mask == 255
        assert (void[:, :-1] & fg[:, 1:]).any() or (void[:, 1:] & fg[:, :-1]).any()
        assert (void[:, :-1] & (mask[:, 1:] == 0)).any() or (void[:, 1:] & (mask[:, :-1] == 0)).any()
        near = np.zeros_like(void)
        for o in m["objects"]:  # bbox (1-based, inclusive) of the visible region before banding
            x0, y0, x1, y1 = o["bbox"]
            near[max(y0 - 2, 0) : y1 + 1, max(x0 - 2, 0) : x1 + 1] = True
        assert near[void].all(), m["id"]
        assert void.mean() < 0.3


def test_boundary_band_geometry():
    inst = np.zeros((14, 14), dtype=np.int16)
    inst[2:, 2:10] = 1  # touches the bottom border
    inst[4:6, 7:] = 2  # occludes object 1, touches the right border
    assert not boundary_band(inst, 0).any()
    for width in (1, 2, 3, 4):
        band = boundary_band(inst, width)
        assert not band[13, 4:8].any()  # the image border is not a boundary
        # along row 10 (crossing the background/object boundary at column 2): `width` band pixels
        left = band[10, :7]
        assert left.sum() == width, (width, left)
        if width % 2:  # the odd pixel goes to the object side
            assert left[2 + width // 2]
    # object/object boundary: both sides (width 2), the occluder's side for width 1
    assert boundary_band(inst, 2)[3, 8] and boundary_band(inst, 2)[4, 8]
    assert boundary_band(inst, 1)[4, 8] and not boundary_band(inst, 1)[3, 8]


def test_several_classes_and_sizes(medium):
    _, ds, meta = medium
    n_classes = [len({o["class"] for o in m["objects"]}) for m in meta]
    assert max(n_classes) >= 3
    assert np.mean(np.asarray(n_classes) >= 2) > 0.25
    assert max(len(m["objects"]) for m in meta) <= len(PRESETS["tiny"]["objects_per_image"])
    sizes = [o["size_frac"] for m in meta for o in m["objects"]]
    assert min(sizes) < 0.12 and max(sizes) > 0.6
    areas = [o["area_frac"] for m in meta for o in m["objects"]]
    assert min(areas) < 0.005 and max(areas) > 0.2
    # every foreground class occurs; labels from masks agree with the annotation files
    seen = np.zeros(ds.num_fg_classes)
    for m in meta:
        labels = ds.labels(m["id"])
        assert labels.sum() >= 1
        np.testing.assert_array_equal(labels, ds.labels_from_xml(m["id"]))
        seen += labels
    assert (seen > 0).all()
    # image sizes vary within the configured range
    shapes = {(m["height"], m["width"]) for m in meta}
    assert len(shapes) > 20
    assert all(96 <= max(s) <= 128 for s in shapes)
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)


def test_colour_does_not_identify_the_class(medium):
    """Class hue ranges overlap: the mean colour of many classes' objects falls in the same hue bin."""
    import colorsys

    _, ds, meta = medium
    hues: dict = {}
    for m in meta[:120]:
        image = ds.load_image(m["id"]).astype(np.float64) / 255
        mask = ds.load_mask(m["id"])
        for c in np.unique(mask):
            if c in (0, 255):
                continue
            r, g, b = image[mask == c].mean(axis=0)
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            hues.setdefault(int(h * 6) % 6, set()).add(int(c))
    assert max(len(v) for v in hues.values()) >= 4
