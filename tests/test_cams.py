"""Tests for the HDF5 CAM store (wsss.cams)."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import pickle

import h5py
import numpy as np
import pytest

import wsss
from wsss.cams import FORMAT_VERSION, CamShardWriter, CamStore, config_hash, merge_shards

CONFIG = {"cam": {"scales": [1.0, 0.5], "backbone": "resnet50"}, "seed": 0}
SCALES = [1.0, 0.5]


def make_maps(rng, k, h=37, w=50):
    keys = np.sort(rng.choice(20, size=k, replace=False)).astype(np.int64)
    cam = rng.random((k, math.ceil(h / 4), math.ceil(w / 4))).astype(np.float32)
    high = rng.random((k, h, w)).astype(np.float32)
    if k:
        high[:, 0, 0] = 1.0
        high[:, 1, 1] = 0.0
    return keys, cam, high


def write_shard(path, images, config=CONFIG, shard_index=0, num_shards=1):
    with CamShardWriter(
        path, config=config, scales=SCALES, normalisation="max", shard_index=shard_index, num_shards=num_shards
    ) as w:
        for image_id, (keys, cam, high) in images.items():
            w.add(image_id, keys, cam, high)
    return path


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    out = {f"img_{i}": make_maps(rng, k, h=37 + i, w=50 - i) for i, k in enumerate([1, 2, 3, 0, 2, 1])}
    return out


def fp16(x):
    return np.clip(x, 0, 1).astype(np.float16).astype(np.float32)


def assert_record(rec, keys, cam, high):
    assert rec.keys.dtype == np.int64 and rec.cam.dtype == np.float32 and rec.high_res.dtype == np.float32
    np.testing.assert_array_equal(rec.keys, keys)
    np.testing.assert_array_equal(rec.cam, fp16(cam))
    np.testing.assert_array_equal(rec.high_res, fp16(high))
    np.testing.assert_allclose(rec.high_res, high, atol=5e-4)  # float16 spacing below 1 is 2**-11
    assert rec.size == high.shape[1:]


def test_config_hash_is_canonical(tmp_path):
    a = {"b": 1, "a": {"y": [1, 2], "x": 0.5}}
    b = {"a": {"x": 0.5, "y": [1, 2]}, "b": 1}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16 and int(config_hash(a), 16) >= 0
    assert config_hash(a) != config_hash({**a, "b": 2})
    # the stored config_json parses back to the config the stored hash was taken of
    path = write_shard(tmp_path / "cams.h5", {}, config=b)
    with h5py.File(path, "r") as f:
        text, stored = f.attrs["config_json"], f.attrs["config_hash"]
    assert json.loads(text) == a and config_hash(json.loads(text)) == stored == config_hash(a)


def test_round_trip(tmp_path, images):
    path = write_shard(tmp_path / "cams.h5", images)
    with CamStore([path]) as store:
        assert len(store) == len(images) and set(store.ids()) == set(images)
        assert "img_0" in store and "nope" not in store
        for image_id, (keys, cam, high) in images.items():
            assert_record(store[image_id], keys, cam, high)
        empty = store["img_3"]
        assert empty.keys.shape == (0,) and empty.cam.shape == (0, 10, 12) and empty.high_res.shape == (0, 40, 47)
        assert empty.size == (40, 47)
        assert store.attrs["format_version"] == FORMAT_VERSION
        assert store.attrs["package_version"] == wsss.__version__
        assert store.attrs["config_hash"] == config_hash(CONFIG)
        assert store.config == CONFIG
        np.testing.assert_array_equal(store.attrs["scales"], SCALES)
        assert store.attrs["normalisation"] == "max"
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] == True  # noqa: E712 (numpy bool)
        assert f.attrs["num_images"] == len(images)
        assert (f.attrs["shard_index"], f.attrs["num_shards"]) == (0, 1)
        g = f["img_2"]
        assert g["keys"].dtype == np.int16 and g["cam"].dtype == np.float16 and g["high_res"].dtype == np.float16
        assert g["high_res"].compression == "gzip" and g["high_res"].shuffle and g["high_res"].chunks is not None
        assert (g.attrs["height"], g.attrs["width"]) == (39, 48)


def test_get_reads_only_requested_fields(tmp_path, images):
    with CamStore(write_shard(tmp_path / "cams.h5", images)) as store:
        rec = store.get("img_1")
        assert rec.cam is None and rec.keys is not None and rec.high_res is not None
        rec = store.get("img_1", fields=("cam",))
        assert rec.keys is None and rec.high_res is None and rec.cam.shape == images["img_1"][1].shape
        with pytest.raises(ValueError, match="unknown CAM fields"):
            store.get("img_1", fields=("logits",))
        with pytest.raises(KeyError, match="missing_id"):
            store["missing_id"]


def test_large_maps_are_chunked_per_class_plane(tmp_path):
    rng = np.random.default_rng(1)
    keys, cam, high = make_maps(rng, 3, h=375, w=500)
    path = write_shard(tmp_path / "cams.h5", {"big": (keys, cam, high)})
    with h5py.File(path, "r") as f:
        assert f["big/high_res"].chunks == (1, 375, 500)
        assert f["big/cam"].chunks == (3, 94, 125)
    with CamStore(path) as store:
        assert_record(store["big"], keys, cam, high)


def test_multi_shard_random_access_and_merge(tmp_path, images):
    ids = list(images)
    paths = [
        write_shard(tmp_path / f"cams_{s}.h5", {i: images[i] for i in ids[s::3]}, shard_index=s, num_shards=3)
        for s in range(3)
    ]
    with CamStore(paths) as store:
        assert sorted(store.ids()) == sorted(ids)
        for image_id in reversed(ids):
            assert_record(store[image_id], *images[image_id])

    merged = merge_shards(paths, tmp_path / "merged.h5")
    assert sorted(os.listdir(tmp_path)) == ["cams_0.h5", "cams_1.h5", "cams_2.h5", "merged.h5"]
    with h5py.File(merged, "r") as f:
        assert (f.attrs["num_shards"], f.attrs["shard_index"], f.attrs["num_images"]) == (1, 0, len(ids))
        assert f.attrs["complete"] == True  # noqa: E712
        assert f["img_2/high_res"].compression == "gzip"
    with CamStore([merged]) as store, CamStore(paths) as sharded:
        assert sorted(store.ids()) == sorted(ids)
        assert store.attrs["config_hash"] == sharded.attrs["config_hash"]
        for image_id in ids:
            assert_record(store[image_id], *images[image_id])

    with pytest.raises(ValueError, match="every shard"):
        merge_shards(paths[:2], tmp_path / "partial.h5")
    assert not (tmp_path / "partial.h5").exists()


def test_writer_uses_temp_file_and_renames(tmp_path, images):
    path = tmp_path / "cams.h5"
    with CamShardWriter(path, config=CONFIG, scales=SCALES, normalisation="max") as w:
        w.add("img_0", *images["img_0"])
        assert not path.exists()
        tmp_files = list(tmp_path.iterdir())
        assert len(tmp_files) == 1 and tmp_files[0].name.startswith(".tmp-")
    assert [p.name for p in tmp_path.iterdir()] == ["cams.h5"]
    with CamStore(path) as store:
        assert store.ids() == ["img_0"]


def test_exception_leaves_no_file(tmp_path, images):
    path = tmp_path / "cams.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with CamShardWriter(path, config=CONFIG, scales=SCALES, normalisation="max") as w:
            w.add("img_0", *images["img_0"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_existing_file(tmp_path, images):
    path = write_shard(tmp_path / "cams.h5", {"img_0": images["img_0"]})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="img_1"):
        with CamShardWriter(path, config=CONFIG, scales=SCALES, normalisation="max") as w:
            w.add("img_2", *images["img_2"])
            keys, cam, high = images["img_1"]
            w.add("img_1", keys, cam, high * 2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cams.h5"]


def test_add_outside_context_manager(tmp_path, images):
    w = CamShardWriter(tmp_path / "cams.h5", config=CONFIG, scales=SCALES, normalisation="max")
    with pytest.raises(RuntimeError, match="context manager"):
        w.add("img_0", *images["img_0"])


def test_incomplete_file_is_refused(tmp_path):
    path = tmp_path / "cams.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["config_hash"] = config_hash(CONFIG)
        f.create_group("img_0")
    with pytest.raises(ValueError, match="incomplete or interrupted CAM shard .*cams.h5"):
        CamStore([path])


def test_format_version_mismatch(tmp_path, images):
    path = write_shard(tmp_path / "cams.h5", {"img_0": images["img_0"]})
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=f"format_version {FORMAT_VERSION + 1}"):
        CamStore([path])


def test_not_a_cam_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(ValueError, match="not a wsss CAM shard"):
        CamStore(path)


def test_config_hash_mismatch_between_shards(tmp_path, images):
    a = write_shard(tmp_path / "a.h5", {"img_0": images["img_0"]}, shard_index=0, num_shards=2)
    b = write_shard(
        tmp_path / "b.h5", {"img_1": images["img_1"]}, config={**CONFIG, "seed": 1}, shard_index=1, num_shards=2
    )
    with pytest.raises(ValueError, match="different configs") as e:
        CamStore([a, b])
    assert str(a) in str(e.value) and str(b) in str(e.value)


def test_duplicate_ids(tmp_path, images):
    a = write_shard(tmp_path / "a.h5", {"img_0": images["img_0"]}, shard_index=0, num_shards=2)
    b = write_shard(tmp_path / "b.h5", {"img_0": images["img_0"]}, shard_index=1, num_shards=2)
    with pytest.raises(ValueError, match="'img_0' is in two CAM shards") as e:
        CamStore([a, b])
    assert str(a) in str(e.value) and str(b) in str(e.value)
    with pytest.raises(ValueError, match="'img_0' was already added"):
        with CamShardWriter(tmp_path / "c.h5", config=CONFIG, scales=SCALES, normalisation="max") as w:
            w.add("img_0", *images["img_0"])
            w.add("img_0", *images["img_0"])
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda k, c, h: (k, c, h + 0.01), r"high_res values span .*outside \[0, 1\]"),
        (lambda k, c, h: (k, c - 0.01, h), r"cam values span .*outside \[0, 1\]"),
        (lambda k, c, h: (k, c, np.where(h > 0.5, np.nan, h)), "NaN"),
        (lambda k, c, h: (k, c[:, :-1], h), r"ceil\(H/4\)"),
        (lambda k, c, h: (k[:1], c, h), "must have shape"),
        (lambda k, c, h: (k.astype(np.float32), c, h), "integer"),
        (lambda k, c, h: (np.array([1, 1]), c, h), "duplicates"),
        (lambda k, c, h: (k, c, (h * 255).astype(np.uint8)), "float array"),
    ],
)
def test_invalid_maps_raise_naming_the_image(tmp_path, images, change, match):
    keys, cam, high = change(*images["img_1"])
    with pytest.raises(ValueError, match=match) as e:
        with CamShardWriter(tmp_path / "cams.h5", config=CONFIG, scales=SCALES, normalisation="max") as w:
            w.add("img_1", keys, cam, high)
    assert "img_1" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_small_excursions_are_clipped(tmp_path, images):
    keys, cam, high = images["img_1"]
    high = high.copy()
    high[0, 0, 0], high[0, 1, 1] = 1.0005, -0.0005
    path = write_shard(tmp_path / "cams.h5", {"img_1": (keys, cam, high)})
    with CamStore(path) as store:
        rec = store["img_1"]
    assert rec.high_res.max() == 1.0 and rec.high_res.min() == 0.0


def test_lazy_open_per_process(tmp_path, images):
    path = write_shard(tmp_path / "cams.h5", images)
    store = CamStore([path])
    assert store._files == [None]  # nothing open after indexing, so forking is safe
    store["img_0"]
    first = store._files[0]
    assert first is not None and store["img_1"] is not None and store._files[0] is first
    store._pid = -1  # as if this object had been inherited from another process
    assert_record(store["img_2"], *images["img_2"])
    assert store._files[0] is not first and store._files[0].id.valid
    first.close()
    store.close()
    assert store._files == [None]


def test_pickled_store_reopens(tmp_path, images):
    path = write_shard(tmp_path / "cams.h5", images)
    with CamStore([path]) as store:
        store["img_0"]
        clone = pickle.loads(pickle.dumps(store))
    assert clone._files == [None]
    assert_record(clone["img_4"], *images["img_4"])
    clone.close()


_INHERITED: CamStore | None = None


def _read_inherited(image_id):
    rec = _INHERITED[image_id]  # the store object the worker inherited from the parent by fork
    return image_id, float(rec.high_res.sum()), os.getpid()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_forked_workers_read(tmp_path, images):
    global _INHERITED
    path = write_shard(tmp_path / "cams.h5", images)
    with CamStore([path]) as store:
        store["img_0"]  # the parent has the file open when the workers fork
        _INHERITED = store
        try:
            with mp.get_context("fork").Pool(2) as pool:
                out = pool.map(_read_inherited, list(images))
        finally:
            _INHERITED = None
        for image_id, total, pid in out:
            assert pid != os.getpid()
            assert total == pytest.approx(float(fp16(images[image_id][2]).sum()), rel=1e-6)
        assert_record(store["img_5"], *images["img_5"])  # the parent's handle still works
