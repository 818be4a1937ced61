"""Dataset statistics (tidy CSV) and the ground-truth montage."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wsss.data.base import SegDataset
from wsss.data.stats import SIZE_BINS, dataset_stats, montage_ids, montage_size, write_stats
from wsss.data.synthetic import generate_synthetic
from wsss.data.voc import VOCDataset
from wsss.io import DataError, voc_palette, write_label_png


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats") / "tiny"
    generate_synthetic(root, preset="tiny", seed=1, progress=False)
    return VOCDataset(root)


def _value(df: pd.DataFrame, section: str, split: str, key: str):
    sel = df[(df.section == section) & (df.split == split) & (df.key == key)]
    assert len(sel) == 1, (section, split, key)
    return sel.value.iloc[0]


def test_stats_agree_with_direct_computation(tiny):
    ds = tiny
    splits = ["train", "val", "train_aug"]
    df = dataset_stats(ds, splits, progress=False)
    assert list(df.columns) == ["section", "split", "key", "value"]
    assert set(df.split) == set(splits)
    for split in splits:
        ids = ds.ids(split)
        masks = [ds.load_mask(i) for i in ids]
        assert _value(df, "images", split, "count") == len(ids)
        assert _value(df, "images", split, "missing_mask") == 0
        assert _value(df, "images", split, "mean_height") == pytest.approx(np.mean([m.shape[0] for m in masks]))
        valid = sum(int((m != 255).sum()) for m in masks)
        for c, name in enumerate(ds.class_names):
            assert _value(df, "class_images", split, name) == sum(bool((m == c).any()) for m in masks)
            freq = sum(int((m == c).sum()) for m in masks) / valid
            assert _value(df, "class_pixel_freq", split, name) == pytest.approx(freq)
        per_image = [len(set(np.unique(m).tolist()) - {0, 255}) for m in masks]
        for k in range(max(per_image) + 1):
            assert _value(df, "classes_per_image", split, str(k)) == per_image.count(k)
        fracs = [float((m == c).mean()) for m in masks for c in np.unique(m) if c not in (0, 255)]
        hist, _ = np.histogram(fracs, bins=SIZE_BINS)
        got = df[(df.section == "object_size") & (df.split == split)].value.tolist()
        assert got == hist.tolist()
        total = sum(m.size for m in masks)
        ignored = sum(int((m == 255).sum()) for m in masks)
        assert _value(df, "ignore", split, "fraction") == pytest.approx(ignored / total)
        assert 0 < ignored / total < 0.3
    # pixel frequencies sum to one
    freq = df[(df.section == "class_pixel_freq") & (df.split == "val")].value.astype(float)
    assert freq.sum() == pytest.approx(1.0)


def test_write_stats_files(tiny, tmp_path):
    ds = tiny
    csv = tmp_path / "out" / "stats.csv"
    png = tmp_path / "out" / "montage.png"
    df = write_stats(ds, ds.splits(), csv, png, n_montage=16, seed=0, progress=False)
    back = pd.read_csv(csv)
    assert list(back.columns) == ["section", "split", "key", "value"]
    assert len(back) == len(df)
    assert back[(back.section == "images") & (back.split == "train_aug") & (back.key == "count")].value.iloc[0] == 24
    assert "value\n" in csv.read_text().splitlines()[0] + "\n"
    assert ",train_aug,count,24\n" in csv.read_text()  # counts are written as integers
    with Image.open(png) as im:
        assert im.size == montage_size(16)
        assert im.mode == "RGB"
        arr = np.asarray(im)
    assert arr.std() > 10  # not blank
    assert not list((tmp_path / "out").glob(".tmp-*"))
    # fewer images than asked: one tile each; ids are reproducible
    write_stats(ds, ["train"], tmp_path / "s2.csv", tmp_path / "m2.png", n_montage=50, progress=False)
    with Image.open(tmp_path / "m2.png") as im:
        assert im.size == montage_size(len(ds.ids("train")))
    assert montage_ids(ds, ds.splits(), 5, seed=3) == montage_ids(ds, ds.splits(), 5, seed=3)
    assert len(set(montage_ids(ds, ds.splits(), 5, seed=3))) == 5


def test_missing_masks_are_counted_or_raise(tiny):
    voc = VOCDataset(tiny.root, mask_dir="SegmentationClass")  # original-VOC masks: train + val only
    df = dataset_stats(voc, ["train_aug", "train"], progress=False)
    assert _value(df, "images", "train_aug", "missing_mask") == 24 - 8
    assert _value(df, "images", "train_aug", "with_mask") == 8
    assert _value(df, "images", "train", "missing_mask") == 0
    with pytest.raises(DataError):
        dataset_stats(voc, ["train_aug"], on_missing="error", progress=False)


class _ListDataset(SegDataset):
    """A minimal non-VOC dataset: two images in a flat folder."""

    def __init__(self, root: Path):
        self.root = root
        self.class_names = ["background", "a", "b"]

    def splits(self) -> List[str]:
        return ["all"]

    def ids(self, split: str) -> List[str]:
        if split != "all":
            raise KeyError(split)
        return ["x", "y"]

    def image_path(self, image_id: str) -> Path:
        return self.root / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.root / f"{image_id}.png"


def test_any_seg_dataset(tmp_path):
    masks = {"x": np.zeros((10, 20), np.uint8), "y": np.zeros((30, 10), np.uint8)}
    masks["x"][:5, :10] = 1  # 50 px of 200 -> 0.25 bin
    masks["y"][:2, :1] = 2  # 2 px of 300 -> 0.0-0.01 bin
    masks["y"][10:20, :] = 1  # 100 px of 300 -> 0.25-0.5 bin
    masks["y"][29, :] = 255
    for k, m in masks.items():
        Image.fromarray(np.full(m.shape + (3,), 128, np.uint8)).save(tmp_path / f"{k}.jpg")
        write_label_png(tmp_path / f"{k}.png", m)
    ds = _ListDataset(tmp_path)
    df = write_stats(ds, ["all"], tmp_path / "s.csv", tmp_path / "m.png", n_montage=4, progress=False)
    assert _value(df, "class_images", "all", "a") == 2
    assert _value(df, "class_images", "all", "b") == 1
    assert _value(df, "classes_per_image", "all", "1") == 1
    assert _value(df, "classes_per_image", "all", "2") == 1
    assert _value(df, "object_size", "all", "0-0.01") == 1
    assert _value(df, "object_size", "all", "0.25-0.5") == 2
    assert _value(df, "ignore", "all", "pixels_ignored") == 10
    assert _value(df, "class_pixel_freq", "all", "b") == pytest.approx(2 / 490)
    with Image.open(tmp_path / "m.png") as im:
        assert im.size == montage_size(2)
        tile = np.asarray(im)[:160, :160].astype(int)
    # image x (10 x 20, grey 128) is scaled 8x into the tile, centred vertically (rows 40..119);
    # its class-1 block (rows 0-4, cols 0-9) is blended with palette colour 1 at alpha 0.5
    expected = (0.5 * 128 + 0.5 * voc_palette()[1].astype(float)).round()
    assert np.abs(tile[60, 40] - expected).max() <= 2
    assert np.abs(tile[100, 120] - 128).max() <= 2  # background untouched
    assert np.abs(tile[5, 5] - 128).max() <= 2  # letterbox
