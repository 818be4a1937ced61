"""Damaged or unusual files must fail loudly, never give silently wrong results (issue 12).

* 16-bit images are scaled to 8 bits, not clipped to white (wsss.io.read_image);
* a damaged CAM shard (flipped bytes, bad keys) raises DataError naming the file and the image;
* a full disk while writing a checkpoint names the file, the cause and the free space;
* temporary files of killed jobs are removed when the same output is written again.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from wsss import io as wsss_io
from wsss.cams import FORMAT_VERSION, CamShardWriter, CamStore, config_hash, merge_shards
from wsss.io import DataError, atomic_path, read_image

# ----------------------------------------------------------------------------------------------
# 16-bit images


def png_bytes(arr: np.ndarray, color_type: int, bit_depth: int = 16) -> bytes:
    """A PNG file (no interlace, filter 0) holding ``arr`` as big-endian samples of ``bit_depth``."""
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + np.ascontiguousarray(arr[y]).astype(dtype).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def gray16(h=5, w=7):
    return (np.arange(h * w, dtype=np.int64).reshape(h, w) * 65535 // (h * w - 1)).astype(np.uint16)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    g = gray16()
    p = tmp_path / "gray16.png"
    Image.fromarray(g).save(p)  # PIL writes uint16 as a 16-bit grayscale PNG (mode I;16)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == g.shape + (3,)
    expected = (g >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)
    assert (out == 255).mean() < 0.2  # clipping would make nearly everything white


def test_16bit_grayscale_png_written_by_hand(tmp_path):
    g = gray16(4, 6)
    p = tmp_path / "gray16b.png"
    p.write_bytes(png_bytes(g, color_type=0))
    np.testing.assert_array_equal(read_image(p), np.repeat((g >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_16bit_grayscale_tiff(tmp_path):
    g = gray16()
    p = tmp_path / "gray16.tif"
    Image.fromarray(g).save(p)
    np.testing.assert_array_equal(read_image(p)[..., 0], (g >> 8).astype(np.uint8))


@pytest.mark.parametrize("color_type,channels", [(2, 3), (6, 4), (4, 2)], ids=["rgb48", "rgba64", "gray-alpha32"])
def test_16bit_colour_pngs(tmp_path, color_type, channels):
    rng = np.random.default_rng(color_type)
    arr = rng.integers(0, 65536, size=(6, 5, channels), dtype=np.int64).astype(np.uint16)
    p = tmp_path / "c16.png"
    p.write_bytes(png_bytes(arr, color_type=color_type))
    out = read_image(p)
    hi = (arr >> 8).astype(np.uint8)
    expected = hi[..., :3] if channels >= 3 else np.repeat(hi[..., :1], 3, axis=2)
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
    np.testing.assert_array_equal(out, expected)


def test_8bit_images_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    gray = rng.integers(0, 256, size=(4, 5), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_image(tmp_path / "l.png"), np.repeat(gray[..., None], 3, axis=2))


def test_float_image_is_refused_naming_the_file(tmp_path):
    p = tmp_path / "float.tif"
    Image.fromarray(np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)).save(p)
    with pytest.raises(DataError, match=r"float\.tif.*8-bit RGB"):
        read_image(p)


# ----------------------------------------------------------------------------------------------
# damaged CAM shards

CONFIG = {"cam": {"scales": [1.0]}, "seed": 0}
NUM_CLASSES = 20


def make_maps(rng, k, h=37, w=50):
    keys = np.sort(rng.choice(NUM_CLASSES, size=k, replace=False)).astype(np.int64)
    cam = rng.random((k, math.ceil(h / 4), math.ceil(w / 4))).astype(np.float32)
    high = rng.random((k, h, w)).astype(np.float32)
    return keys, cam, high


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return {f"img_{i}": make_maps(rng, k, h=37 + i, w=50 - i) for i, k in enumerate([1, 2, 3, 0])}


def write_shard(path, images, num_classes=NUM_CLASSES, **kw):
    with CamShardWriter(path, config=CONFIG, scales=[1.0], normalisation="max", num_classes=num_classes, **kw) as w:
        for image_id, maps in images.items():
            w.add(image_id, *maps)
    return path


def flip_bytes_in_chunk(path, dataset, n=4):
    """Invert ``n`` bytes in the middle of the first stored chunk of ``dataset``, on disk."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        assert ds.chunks is not None
        info = ds.id.get_chunk_info(0)
        offset, size = info.byte_offset, info.size
    assert size > n
    start = offset + size // 2 - n // 2
    with open(path, "r+b") as fh:
        fh.seek(start)
        data = fh.read(n)
        fh.seek(start)
        fh.write(bytes(b ^ 0xFF for b in data))


def test_written_datasets_carry_checksums_and_class_count(tmp_path, images):
    path = write_shard(tmp_path / "cams.h5", images)
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION == 2
        assert int(f.attrs["num_classes"]) == NUM_CLASSES
        for name in ("keys", "cam", "high_res"):
            assert f["img_2"][name].fletcher32, name
        assert f["img_2"]["cam"].compression == "gzip" and f["img_2"]["cam"].shuffle
    with CamStore(path) as store:
        assert store.num_classes == NUM_CLASSES
        rec = store["img_2"]
        keys, cam, high = images["img_2"]
        np.testing.assert_array_equal(rec.keys, keys)
        np.testing.assert_array_equal(rec.high_res, high.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(rec.cam, cam.astype(np.float16).astype(np.float32))
        assert store["img_3"].keys.shape == (0,)


@pytest.mark.parametrize("dataset", ["high_res", "cam", "keys"])
def test_flipped_bytes_raise_data_error_naming_file_and_image(tmp_path, images, dataset):
    path = write_shard(tmp_path / "shard-0.h5", images)
    flip_bytes_in_chunk(path, f"img_1/{dataset}", n=2 if dataset == "keys" else 8)
    with CamStore(path) as store:
        with pytest.raises(DataError, match=r"shard-0\.h5.*'img_1'"):
            store.get("img_1", fields=("keys", "cam", "high_res"))
        rec = store["img_0"]  # the other images are still readable
        np.testing.assert_array_equal(rec.keys, images["img_0"][0])


def set_keys(path, image_id, keys):
    with h5py.File(path, "a") as f:
        g = f[image_id]
        del g["keys"]
        g.create_dataset("keys", data=np.asarray(keys, dtype=np.int16))


@pytest.mark.parametrize(
    "keys,match",
    [([3, NUM_CLASSES], "num_classes"), ([5, 5], "duplicates"), ([-1, 4], "negative"), ([[1, 2]], "1-D")],
    ids=["out-of-range", "duplicate", "negative", "not-1d"],
)
def test_bad_keys_raise_data_error(tmp_path, images, keys, match):
    path = write_shard(tmp_path / "cams.h5", images)
    set_keys(path, "img_1", keys)  # img_1 has K = 2
    with CamStore(path) as store:
        with pytest.raises(DataError, match=rf"cams\.h5.*'img_1'.*{match}"):
            store.get("img_1", fields=("high_res",))
        with pytest.raises(DataError, match=match):
            merge_shards([path], tmp_path / "merged.h5")
    assert not (tmp_path / "merged.h5").exists()


def test_keys_that_disagree_with_the_maps_raise(tmp_path, images):
    path = write_shard(tmp_path / "cams.h5", images)
    set_keys(path, "img_1", [4])  # K = 1 but the maps hold 2 planes
    with CamStore(path) as store, pytest.raises(DataError, match=r"'img_1'.*(cam|high_res) has shape"):
        store.get("img_1", fields=("keys", "high_res"))


def test_writer_refuses_keys_beyond_num_classes(tmp_path, images):
    keys, cam, high = images["img_1"]
    with pytest.raises(ValueError, match="num_classes"):
        with CamShardWriter(tmp_path / "c.h5", config=CONFIG, scales=[1.0], normalisation="max", num_classes=4) as w:
            w.add("img_1", np.array([1, 4]), cam, high)
    assert not (tmp_path / "c.h5").exists()


def test_shards_with_different_num_classes_are_refused(tmp_path, images):
    a = write_shard(tmp_path / "a.h5", {"img_0": images["img_0"]}, shard_index=0, num_shards=2)
    b = write_shard(tmp_path / "b.h5", {"img_1": images["img_1"]}, num_classes=30, shard_index=1, num_shards=2)
    with pytest.raises(DataError, match="num_classes"):
        CamStore([a, b])


def write_v1_shard(path, images, shard_index=0, num_shards=1):
    """A shard exactly as format version 1 wrote it: no checksums, no num_classes attr."""
    with h5py.File(path, "w") as f:
        attrs = {
            "format_version": 1,
            "package_version": "0.0-v1",
            "config_hash": config_hash(CONFIG),
            "config_json": '{"cam": {"scales": [1.0]}, "seed": 0}',
            "scales": np.array([1.0]),
            "normalisation": "max",
            "shard_index": shard_index,
            "num_shards": num_shards,
            "num_images": len(images),
            "complete": True,
        }
        for k, v in attrs.items():
            f.attrs[k] = v
        for image_id, (keys, cam, high) in images.items():
            g = f.create_group(image_id)
            g.attrs["height"], g.attrs["width"] = high.shape[1:]
            g.create_dataset("keys", data=keys.astype(np.int16))
            for name, arr in (("cam", cam), ("high_res", high)):
                arr = arr.astype(np.float16)
                if arr.size:
                    g.create_dataset(
                        name, data=arr, chunks=arr.shape, compression="gzip", compression_opts=4, shuffle=True
                    )
                else:
                    g.create_dataset(name, shape=arr.shape, dtype=np.float16)
    return path


def test_version_1_shards_are_still_read_and_merged(tmp_path, images):
    ids = list(images)
    v1 = write_v1_shard(tmp_path / "v1.h5", {i: images[i] for i in ids[:2]}, shard_index=0, num_shards=2)
    v2 = write_shard(tmp_path / "v2.h5", {i: images[i] for i in ids[2:]}, shard_index=1, num_shards=2)
    with CamStore([v1, v2]) as store:
        assert store.format_versions == [1, 2] and store.num_classes == NUM_CLASSES
        for image_id in ids:
            np.testing.assert_array_equal(store[image_id].keys, images[image_id][0])
    merged = merge_shards([v1, v2], tmp_path / "merged.h5")
    with h5py.File(merged, "r") as f:
        assert f.attrs["format_version"] == 1  # some groups have no checksums
        assert int(f.attrs["num_classes"]) == NUM_CLASSES
    set_keys(v1, ids[0], [7, 7])  # version-1 files get the keys checks too
    with CamStore(v1) as store, pytest.raises(DataError, match="duplicates"):
        store[ids[0]]


# ----------------------------------------------------------------------------------------------
# full disk while writing a checkpoint

TORCH_WRITE_FAILURE = (
    "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed"
)


def shutil_usage(total, used, free):
    return shutil._ntuple_diskusage(total, used, free)


def _small_state():
    return {"model": {"w": torch.zeros(256, 256)}, "epoch": 1}


def test_full_disk_torch_error_names_file_and_free_space(tmp_path, monkeypatch):
    from wsss import engine

    path = tmp_path / "ckpt" / "last.pt"
    engine.save_checkpoint(path, **_small_state())  # a previous complete checkpoint
    before = path.read_bytes()

    def failing_save(obj, f, *a, **kw):
        Path(f).write_bytes(b"PK\x03\x04 partial")  # torch writes part of the zip, then fails
        raise RuntimeError(TORCH_WRITE_FAILURE)

    monkeypatch.setattr(engine.torch, "save", failing_save)
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda folder: shutil_usage(10 << 30, 10 << 30, 4096))
    with pytest.raises(engine.CheckpointWriteError) as info:
        engine.save_checkpoint(path, **_small_state())
    msg = str(info.value)
    assert str(path) in msg and "no space left on device" in msg and "free in" in msg and "0.0 MiB free" in msg
    assert "0.2 MiB" in msg  # the 256x256 float32 tensor it needed
    assert "inline_container" in msg  # torch's own words are kept
    assert info.value.errno == errno.ENOSPC
    assert isinstance(info.value.__cause__, RuntimeError)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no partial file
    assert path.read_bytes() == before  # the previous checkpoint is untouched


def test_full_disk_oserror_from_a_real_write(tmp_path, monkeypatch):
    """torch.save into /dev/full raises torch's real ENOSPC; the error names the target file."""
    from wsss import engine

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    real_save = torch.save

    def save_to_full_disk(obj, f, *a, **kw):
        with open("/dev/full", "wb") as fh:
            real_save(obj, fh, *a, **kw)

    monkeypatch.setattr(engine.torch, "save", save_to_full_disk)
    path = tmp_path / "model.pt"
    with pytest.raises(
        OSError, match=rf"could not write checkpoint {path}: no space left on device \(.* free in "
    ) as info:
        engine.save_checkpoint(path, **_small_state())
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_other_errors_are_not_disguised_as_disk_errors(tmp_path, monkeypatch):
    from wsss import engine

    def failing_save(obj, f, *a, **kw):
        raise RuntimeError("Can't pickle local object")

    monkeypatch.setattr(engine.torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="^Can't pickle local object$"):
        engine.save_checkpoint(tmp_path / "m.pt", **_small_state())
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# temporary files of killed jobs


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def host_tag() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def test_temp_name_holds_host_and_pid(tmp_path):
    with atomic_path(tmp_path / "shard-1-of-2.h5") as tmp:
        assert tmp.name.startswith(f".tmp-shard-1-of-2-{host_tag()}-{os.getpid()}-") and tmp.name.endswith(".h5")
        tmp.write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["shard-1-of-2.h5"]


def test_stale_temps_of_the_same_output_are_removed(tmp_path):
    host, pid = host_tag(), dead_pid()
    live = os.getppid()  # the pytest runner's parent: alive
    names = {
        "stale": f".tmp-shard-1-of-2-{host}-{pid}-abc123_x.h5",
        "live": f".tmp-shard-1-of-2-{host}-{live}-abc123.h5",
        "other_output": f".tmp-shard-1-of-20-{host}-{pid}-abc123.h5",  # another output, same prefix
        "other_output2": f".tmp-shard-1-of-2-x-{host}-{pid}-abc123.h5",  # stem 'shard-1-of-2-x'
        "other_suffix": f".tmp-shard-1-of-2-{host}-{pid}-abc123.json",
        "other_host": f".tmp-shard-1-of-2-otherhost{host}-{pid}-abc123.h5",
        "old_style": ".tmp-shard-1-of-2-abc123.h5",  # no host or pid: cannot tell, kept
    }
    for name in names.values():
        (tmp_path / name).write_text("partial")
    with atomic_path(tmp_path / "shard-1-of-2.h5") as tmp:
        tmp.write_text("done")
    left = {p.name for p in tmp_path.iterdir()}
    assert names["stale"] not in left
    assert left == {"shard-1-of-2.h5"} | {n for k, n in names.items() if k != "stale"}
    assert wsss_io.remove_stale_temps(tmp_path / "shard-1-of-2.h5") == []


def test_stale_temps_removed_by_cam_writer_and_checkpoint(tmp_path, images):
    from wsss import engine

    host, pid = host_tag(), dead_pid()
    stale_h5 = tmp_path / f".tmp-cams-{host}-{pid}-k1ll3d.h5"
    stale_pt = tmp_path / f".tmp-last-{host}-{pid}-k1ll3d.pt"
    stale_h5.write_bytes(b"\x89HDF partial")
    stale_pt.write_bytes(b"PK partial")
    write_shard(tmp_path / "cams.h5", {"img_0": images["img_0"]})
    engine.save_checkpoint(tmp_path / "last.pt", **_small_state())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cams.h5", "last.pt"]


def test_infer_cams_records_the_class_count(tiny_cfg, tmp_path):
    from wsss.cam_infer import infer_cams
    from wsss.data import open_dataset
    from wsss.methods import build_method
    from wsss.models import build_backbone

    ds = open_dataset(tiny_cfg)
    ids = ds.ids("val")[:2]
    labels = {i: ds.labels(i) for i in ids}
    torch.manual_seed(0)
    bb = build_backbone("resnet18", pretrained="none", freeze_bn=False, trainable_from=None)
    method = build_method("cam", num_classes=ds.num_fg_classes, backbone=bb).eval()
    path = infer_cams(
        method,
        ds,
        ids,
        labels,
        tmp_path / "s.h5",
        scales=[1.0],
        flip=False,
        normalisation="max",
        resolved_config={"x": 1},
        progress=False,
    )
    with CamStore(path) as store:
        assert store.num_classes == ds.num_fg_classes
