"""COCO 2014 conversion (instance annotations -> WSSS label maps) and the COCODataset reader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data import coco
from wsss.data.base import SegDataset, read_labels_csv
from wsss.data.coco import (
    COCO_CATEGORIES,
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    COCO_ID_TO_CONTIGUOUS,
    COCODataset,
    build_coco_masks,
    build_semantic_mask,
    category_map,
    image_labels,
    polygons_to_mask,
    prepare_coco_dataset,
    rle_counts_to_mask,
    rle_string_to_counts,
    segmentation_to_mask,
)
from wsss.io import DataError, read_label_png

# ---------------------------------------------------------------------------------------------
# An encoder written independently of the module, after maskApi's rleEncode + rleToString.
# ---------------------------------------------------------------------------------------------


def encode_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary mask in column-major order, starting with a (possibly empty) 0-run."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    return counts


def counts_to_string(counts: list[int]) -> str:
    """maskApi rleToString: deltas to count i-2 for i > 2, 5-bit chunks + 48, 0x20 = more, 0x10 = sign."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5  # arithmetic shift, as on a C long
            more = (x != -1) if ch & 0x10 else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def rect(h, w, r0, r1, c0, c1):
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# ---------------------------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------------------------


def test_category_constants():
    assert len(COCO_CLASSES) == 81 and COCO_CLASSES[0] == "background"
    assert len(COCO_CATEGORY_IDS) == 80 == len(set(COCO_CATEGORY_IDS))
    assert list(COCO_CATEGORY_IDS) == sorted(COCO_CATEGORY_IDS)
    assert min(COCO_CATEGORY_IDS) == 1 and max(COCO_CATEGORY_IDS) == 90
    assert set(range(1, 91)) - set(COCO_CATEGORY_IDS) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    names = dict(COCO_CATEGORIES)
    assert names[90] == "toothbrush" and COCO_ID_TO_CONTIGUOUS[90] == 80 and COCO_CLASSES[80] == "toothbrush"
    assert names[13] == "stop sign" and COCO_ID_TO_CONTIGUOUS[13] == 12 and COCO_CLASSES[12] == "stop sign"
    assert COCO_ID_TO_CONTIGUOUS[1] == 1 and COCO_CLASSES[1] == "person"
    assert sorted(COCO_ID_TO_CONTIGUOUS.values()) == list(range(1, 81))


def json_categories():
    # the json lists supercategories too; order need not be by id
    cats = [{"supercategory": "x", "id": i, "name": n} for i, n in COCO_CATEGORIES]
    return cats[::-1]


def test_category_map_from_file_list():
    assert category_map(json_categories(), "f.json") == COCO_ID_TO_CONTIGUOUS


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c[:-1],  # one missing
        lambda c: c + [{"id": 12, "name": "street sign"}],  # one extra
        lambda c: [dict(x, name="couch2") if x["id"] == 63 else x for x in c],  # renamed
        lambda c: c + c[:1],  # duplicated
    ],
)
def test_category_map_mismatch(edit):
    with pytest.raises(DataError, match="my_instances.json.*categories"):
        category_map(edit(json_categories()), "my_instances.json")


# ---------------------------------------------------------------------------------------------
# RLE and polygons
# ---------------------------------------------------------------------------------------------


def test_rle_string_known_case():
    # Worked by hand from rleToString: 0 -> '0'; 40 = 8 + 1*32 -> chunks 8|0x20, 1 -> 'X', '1';
    # 5 -> '5'; count 3 is stored as 35 - 40 = -5 -> chunk 27 (sign bit 0x10 set) -> 'K'.
    assert rle_string_to_counts("0X15K") == [0, 40, 5, 35]
    assert rle_string_to_counts(b"0X15K") == [0, 40, 5, 35]
    m = segmentation_to_mask({"size": [8, 10], "counts": "0X15K"}, 8, 10)
    expected = np.zeros((8, 10), dtype=bool)
    expected[:, :5] = True  # 40 ones = columns 0..4 (column-major, 8 rows)
    expected[5:, 5] = True  # 5 zeros = rows 0..4 of column 5, then ones
    expected[:, 6:] = True
    np.testing.assert_array_equal(m, expected)
    assert counts_to_string([0, 40, 5, 35]) == "0X15K"  # the test encoder agrees with the hand work


def test_rle_string_roundtrip():
    rng = np.random.default_rng(0)
    masks = [
        rng.random((37, 53)) < 0.5,  # many short runs
        rect(480, 640, 10, 300, 20, 600),  # long runs (multi-chunk counts)
        rect(100, 90, 0, 100, 0, 90),  # starts with a 1-run: counts[0] == 0
        np.zeros((5, 4), dtype=bool),
    ]
    blobs = rng.random((120, 160)) < 0.02
    for _ in range(3):  # grow blobs: runs of varied length, deltas of both signs
        blobs = blobs | np.roll(blobs, 1, 0) | np.roll(blobs, 1, 1)
    masks.append(blobs)
    for m in masks:
        counts = encode_counts(m)
        s = counts_to_string(counts)
        assert rle_string_to_counts(s) == counts
        np.testing.assert_array_equal(segmentation_to_mask({"size": list(m.shape), "counts": s}, *m.shape), m)


def test_rle_errors():
    with pytest.raises(ValueError, match="invalid character"):
        rle_string_to_counts("0 1")
    with pytest.raises(ValueError, match="ends inside a count"):
        rle_string_to_counts("0X")  # 'X' has the continuation bit
    with pytest.raises(ValueError, match="sum to 5"):
        rle_counts_to_mask([2, 3], 2, 3)
    with pytest.raises(ValueError, match="differs from the image size"):
        segmentation_to_mask({"size": [3, 2], "counts": [6]}, 2, 3)


def test_uncompressed_rle_is_column_major():
    # h=2, w=3; F order: (0,0)=0 (1,0)=1 (0,1)=1 (1,1)=0 (0,2)=0 (1,2)=0
    m = segmentation_to_mask({"size": [2, 3], "counts": [1, 2, 3]}, 2, 3)
    np.testing.assert_array_equal(m, [[0, 1, 0], [1, 0, 0]])


def test_polygon_rectangle_exact():
    # corners on integer coordinates: columns x0..x1-1, rows y0..y1-1 (w*h pixels, as pycocotools)
    m = polygons_to_mask([[2, 3, 12, 3, 12, 10, 2, 10]], 20, 30)
    np.testing.assert_array_equal(m, rect(20, 30, 3, 10, 2, 12))
    # vertex order and a sub-pixel shift < 0.1 (rounded to the 1/5 grid) do not matter
    m2 = polygons_to_mask([[2.04, 10, 12, 10, 12, 3, 2, 3.06]], 20, 30)
    np.testing.assert_array_equal(m2, m)
    # centres decide: an edge at x = 2.6 leaves column 2 (centre 2.5) out, at 2.4 keeps it
    assert not polygons_to_mask([[2.6, 3, 12, 3, 12, 10, 2.6, 10]], 20, 30)[5, 2]
    assert polygons_to_mask([[2.4, 3, 12, 3, 12, 10, 2.4, 10]], 20, 30)[5, 2]
    # union of parts, clipping at the border, degenerate parts ignored
    m3 = polygons_to_mask([[-5, -5, 3, -5, 3, 2, -5, 2], [28, 18, 40, 18, 40, 40], [1, 1, 5, 5]], 20, 30)
    assert m3[:2, :3].all() and m3[:2, :3].sum() == 6 and m3[19, 29] and m3.sum() < 6 + 4
    assert not polygons_to_mask([], 4, 4).any()
    with pytest.raises(ValueError, match="x, y pairs"):
        polygons_to_mask([[1, 2, 3]], 4, 4)


def _inside(poly: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test."""
    inside = np.zeros(px.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
        cross = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (x2 - x1) * (py - y1) / (y2 - y1) + x1
        inside ^= cross & (px < xint)
    return inside


def _edge_distance(poly: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    d = np.full(px.shape, np.inf)
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):
        ab = b - a
        t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / max(ab @ ab, 1e-12), 0, 1)
        d = np.minimum(d, np.hypot(px - a[0] - t * ab[0], py - a[1] - t * ab[1]))
    return d


def test_polygon_matches_pixel_centre_rule():
    """Random polygons: pixel in iff centre inside (vertices on the 1/5 grid), up to 0.1 px at edges."""
    rng = np.random.default_rng(1)
    h, w = 60, 70
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    n_diff = n_in = 0
    for _ in range(100):
        k = rng.integers(3, 9)
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(3, 40, k)
        pts = np.stack([35 + rad * np.cos(ang), 30 + rad * np.sin(ang)], axis=1)
        got = polygons_to_mask([pts.ravel().tolist()], h, w)
        q = np.floor(5 * pts + 0.5) / 5
        want = _inside(q, xx, yy)
        diff = got != want
        n_diff += diff.sum()
        n_in += want.sum()
        if diff.any():  # only pixels whose centre is (almost) on an edge may differ
            assert _edge_distance(q, xx, yy)[diff].max() < 0.1
    assert n_diff < 0.02 * n_in


# ---------------------------------------------------------------------------------------------
# A fabricated mini COCO
# ---------------------------------------------------------------------------------------------

H9, W9 = 20, 30
PERSON = rect(H9, W9, 3, 10, 2, 12)  # polygon below, class 1
STOP = rect(H9, W9, 6, 14, 8, 16)  # compressed RLE, id 13 -> class 12; overlaps PERSON
CROWD = rect(H9, W9, 12, 18, 0, 30)  # uncompressed RLE crowd toothbrush (90 -> 80); overlaps STOP


def mini_coco() -> dict:
    """Two json dicts (train, val) with a polygon, a compressed RLE and an uncompressed-RLE crowd instance."""
    train = {
        "info": {},
        "images": [
            {"id": 9, "height": H9, "width": W9, "file_name": "COCO_train2014_000000000009.jpg"},
            {"id": 25, "height": 16, "width": 16, "file_name": "COCO_train2014_000000000025.jpg"},
            {"id": 30, "height": 10, "width": 12, "file_name": "COCO_train2014_000000000030.jpg"},
        ],
        "annotations": [
            {"id": 101, "image_id": 9, "category_id": 1, "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 12, 10, 2, 10]]},
            {
                "id": 102,
                "image_id": 9,
                "category_id": 13,
                "iscrowd": 0,
                "segmentation": {"size": [H9, W9], "counts": counts_to_string(encode_counts(STOP))},
            },
            {
                "id": 103,
                "image_id": 9,
                "category_id": 90,
                "iscrowd": 1,
                "segmentation": {"size": [H9, W9], "counts": encode_counts(CROWD)},
            },
            # image 25 holds only a crowd region; image 30 has no annotation at all
            {
                "id": 104,
                "image_id": 25,
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": {"size": [16, 16], "counts": encode_counts(rect(16, 16, 0, 8, 0, 16))},
            },
        ],
        "categories": json_categories(),
    }
    val = {
        "images": [{"id": 42, "height": 12, "width": 10, "file_name": "COCO_val2014_000000000042.jpg"}],
        "annotations": [
            {"id": 201, "image_id": 42, "category_id": 89, "iscrowd": 0, "segmentation": [[0, 0, 5, 0, 5, 4, 0, 4]]},
        ],
        "categories": json_categories(),
    }
    return {"train": train, "val": val}


def write_mini_coco(root: Path) -> Path:
    for split, data in mini_coco().items():
        ann = root / "annotations" / f"instances_{split}2014.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps(data))
        for im in data["images"]:
            img = root / f"{split}2014" / im["file_name"]
            img.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (im["width"], im["height"]), (im["id"], 100, 50)).save(img)
    return root


def expected_mask9(crowd: str) -> np.ndarray:
    m = np.zeros((H9, W9), dtype=np.uint8)
    if crowd == "ignore":
        m[CROWD] = 255
    m[PERSON] = 1
    m[STOP] = 12  # later annotation overwrites the person
    return m


@pytest.mark.parametrize("crowd", ["background", "ignore"])
def test_build_semantic_mask(crowd):
    data = mini_coco()["train"]
    info = data["images"][0]
    anns = [a for a in data["annotations"] if a["image_id"] == 9]
    sem = build_semantic_mask(info, anns, COCO_ID_TO_CONTIGUOUS, crowd=crowd)
    assert sem.dtype == np.uint8 and sem.shape == (H9, W9)
    np.testing.assert_array_equal(sem, expected_mask9(crowd))
    # spot checks: overlap of person/stop sign, stop sign over crowd, crowd-only pixel
    assert sem[7, 9] == 12 and sem[4, 3] == 1 and sem[13, 10] == 12
    assert sem[15, 25] == (255 if crowd == "ignore" else 0)


def test_overwrite_order_is_annotation_order():
    data = mini_coco()["train"]
    anns = [a for a in data["annotations"] if a["image_id"] == 9 and not a["iscrowd"]]
    sem = build_semantic_mask(data["images"][0], anns[::-1], COCO_ID_TO_CONTIGUOUS)
    assert sem[7, 9] == 1  # the person is now painted last
    assert (sem == 12).sum() == STOP.sum() - (STOP & PERSON).sum()


def test_image_labels_and_errors():
    data = mini_coco()["train"]
    vec = image_labels(data["annotations"], COCO_ID_TO_CONTIGUOUS)
    assert vec.dtype == np.float32 and vec.shape == (80,)
    # person (1) and stop sign (12) from non-crowd instances; the crowd toothbrush does not count
    assert np.flatnonzero(vec).tolist() == [0, 11]
    with pytest.raises(ValueError, match="crowd policy"):
        build_semantic_mask(data["images"][0], [], COCO_ID_TO_CONTIGUOUS, crowd="void")
    bad = [{"id": 7, "image_id": 9, "category_id": 12, "segmentation": []}]
    with pytest.raises(DataError, match="unknown category_id 12"):
        build_semantic_mask(data["images"][0], bad, COCO_ID_TO_CONTIGUOUS)
    bad = [{"id": 7, "image_id": 9, "category_id": 1, "segmentation": {"size": [2, 2], "counts": [4]}}]
    with pytest.raises(DataError, match="annotation 7 of image 9"):
        build_semantic_mask(data["images"][0], bad, COCO_ID_TO_CONTIGUOUS)


def test_build_coco_masks(tmp_path):
    root = write_mini_coco(tmp_path / "coco")
    out = tmp_path / "masks"
    stats = build_coco_masks(root / "annotations" / "instances_train2014.json", out, crowd="ignore", progress=False)
    assert stats["images"] == 3
    assert stats["annotations"] == 2 and stats["crowd_annotations"] == 2
    assert stats["images_without_annotations"] == 1  # image 30
    assert stats["images_without_labels"] == 2  # images 25 (crowd only) and 30
    assert sorted(p.name for p in out.glob("*.png")) == ["25.png", "30.png", "9.png"]
    assert not list(out.glob(".tmp-*"))
    with Image.open(out / "9.png") as im:
        assert im.mode == "P"
    np.testing.assert_array_equal(read_label_png(out / "9.png"), expected_mask9("ignore"))
    np.testing.assert_array_equal(read_label_png(out / "30.png"), np.zeros((10, 12), np.uint8))
    m25 = read_label_png(out / "25.png")
    assert (m25[:8] == 255).all() and (m25[8:] == 0).all()
    assert (out / "images.txt").read_text() == "9\n25\n30\n"
    labels = read_labels_csv(out / "labels.csv", COCO_CLASSES)
    assert np.flatnonzero(labels["9"]).tolist() == [0, 11]
    assert not labels["25"].any() and not labels["30"].any()

    # a subset, in the given order, to explicit list/labels paths
    stats = build_coco_masks(
        root / "annotations" / "instances_train2014.json",
        tmp_path / "sub",
        image_ids=["30", 9],
        list_path=tmp_path / "sub.txt",
        labels_path=tmp_path / "sub.csv",
        progress=False,
    )
    assert stats["images"] == 2 and (tmp_path / "sub.txt").read_text() == "30\n9\n"
    np.testing.assert_array_equal(read_label_png(tmp_path / "sub" / "9.png"), expected_mask9("background"))
    with pytest.raises(DataError, match="image ids \\[77\\]"):
        build_coco_masks(
            root / "annotations" / "instances_train2014.json", tmp_path / "x", image_ids=[77], progress=False
        )


def test_build_coco_masks_bad_inputs(tmp_path):
    missing = tmp_path / "annotations" / "instances_train2014.json"
    with pytest.raises(DataError, match=f"not found: {missing}"):
        build_coco_masks(missing, tmp_path / "out", progress=False)
    data = mini_coco()["train"]
    data["categories"] = [c for c in data["categories"] if c["id"] != 90]
    bad = tmp_path / "bad_instances.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"{bad}.*missing \\[\\(90, 'toothbrush'\\)\\]"):
        build_coco_masks(bad, tmp_path / "out", progress=False)
    data = mini_coco()["train"]
    data["annotations"][0]["category_id"] = 12
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"{bad}: annotation 101 .* unknown category_id 12"):
        build_coco_masks(bad, tmp_path / "out", progress=False)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match=f"{bad} lacks"):
        build_coco_masks(bad, tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------------
# prepare_coco_dataset, the reader, the CLI
# ---------------------------------------------------------------------------------------------


def test_prepare_and_reader(tmp_path):
    root = write_mini_coco(tmp_path / "coco")
    info = prepare_coco_dataset(root, crowd="background", progress=False)
    marker = json.loads((root / "mask" / ".complete").read_text())
    assert marker == info and marker["crowd"] == "background" and marker["num_classes"] == 81
    from wsss import __version__

    assert marker["wsss_version"] == __version__
    assert marker["splits"]["train"]["images_without_annotations"] == 1
    assert marker["splits"]["val"]["images"] == 1

    ds = COCODataset(root)
    assert isinstance(ds, SegDataset)
    assert ds.splits() == ["train", "val"] and ds.num_classes == 81 and ds.class_names == COCO_CLASSES
    assert ds.ids("train") == ["9", "25", "30"] and ds.ids("val") == ["42"]
    assert ds.image_path("9") == root / "train2014" / "COCO_train2014_000000000009.jpg"
    assert ds.image_path("42") == root / "val2014" / "COCO_val2014_000000000042.jpg"
    assert ds.mask_path("9") == root / "mask" / "train2014" / "9.png"
    assert ds.mask_path("42") == root / "mask" / "val2014" / "42.png"
    img = ds.load_image("9")
    assert img.shape == (H9, W9, 3) and img.dtype == np.uint8
    assert np.abs(img[0, 0] - np.array([9, 100, 50])).max() <= 4  # JPEG is lossy
    np.testing.assert_array_equal(ds.load_mask("9"), expected_mask9("background"))
    m42 = ds.load_mask("42")
    assert (m42[:4, :5] == 79).all() and m42.sum() == 79 * 20  # hair drier: id 89 -> 79
    assert np.flatnonzero(ds.labels("9")).tolist() == [0, 11]
    assert np.flatnonzero(ds.labels("42")).tolist() == [78]
    assert ds.labels("30").shape == (80,) and not ds.labels("30").any()

    with pytest.raises(KeyError, match="valid splits: train, val"):
        ds.ids("test")
    with pytest.raises(KeyError, match="none of the COCO lists"):
        ds.image_path("12345")

    # without the CSV labels come from the mask; a missing image names the file
    (root / "lists" / "val_labels.csv").unlink()
    ds = COCODataset(root)
    assert np.flatnonzero(ds.labels("42")).tolist() == [78]
    (root / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(DataError, match="COCO_val2014_000000000042.jpg"):
        ds.load_image("42")
    (root / "mask" / "val2014" / "42.png").unlink()
    with pytest.raises(DataError, match="42.png"):
        ds.load_mask("42")


def test_reader_missing_lists(tmp_path):
    ds = COCODataset(tmp_path)
    with pytest.raises(DataError, match="lists/train.txt"):
        ds.ids("train")
    with pytest.raises(KeyError, match="lists/val.txt"):
        ds.mask_path("9")


def test_prepare_missing_annotation_file(tmp_path):
    root = write_mini_coco(tmp_path / "coco")
    prepare_coco_dataset(root, progress=False)
    assert (root / "mask" / ".complete").exists()
    val = root / "annotations" / "instances_val2014.json"
    val.unlink()
    with pytest.raises(DataError, match=f"not found: {val}"):
        prepare_coco_dataset(root, progress=False)


def test_prepare_failure_leaves_no_marker(tmp_path):
    root = write_mini_coco(tmp_path / "coco")
    prepare_coco_dataset(root, progress=False)
    val = root / "annotations" / "instances_val2014.json"
    data = json.loads(val.read_text())
    data["categories"] = data["categories"][1:]
    val.write_text(json.dumps(data))
    with pytest.raises(DataError, match="instances_val2014.json"):
        prepare_coco_dataset(root, progress=False)
    assert not (root / "mask" / ".complete").exists()


def test_prepare_checks_file_names(tmp_path):
    root = write_mini_coco(tmp_path / "coco")
    # a train file given as val: file names say train2014
    (root / "annotations" / "instances_val2014.json").write_text(
        (root / "annotations" / "instances_train2014.json").read_text()
    )
    with pytest.raises(DataError, match="expected 'COCO_val2014_000000000009.jpg'"):
        prepare_coco_dataset(root, progress=False)


def test_cli(tmp_path, capsys):
    root = write_mini_coco(tmp_path / "coco")
    assert coco.main([str(root), "--crowd", "ignore", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["crowd"] == "ignore"
    np.testing.assert_array_equal(read_label_png(root / "mask" / "train2014" / "9.png"), expected_mask9("ignore"))
    assert coco.main([str(tmp_path / "nowhere"), "--no-progress"]) == 1
    assert "instances_train2014.json" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    root = write_mini_coco(tmp_path / "coco")
    r = subprocess.run(
        [sys.executable, "-m", "wsss.data.coco", str(root), "--crowd", "background", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (root / "mask" / ".complete").exists()
