"""The IRN gallery: its pure renderings (wsss.viz) and the stage function end to end on the tiny dataset."""

from __future__ import annotations

import numpy as np
import pytest

from wsss.viz import displacement_rgb, grey_rgb, upsample_strided

pytestmark = pytest.mark.usefixtures("single_thread")


def field(dy: float, dx: float, shape=(3, 4)) -> np.ndarray:
    return np.stack([np.full(shape, dy), np.full(shape, dx)])


def hue_of(rgb: np.ndarray) -> float:
    import colorsys

    r, g, b = (rgb.reshape(-1, 3)[0] / 255.0).tolist()
    return colorsys.rgb_to_hsv(r, g, b)[0]


def test_displacement_rgb_directions_are_hues():
    right, left = displacement_rgb(field(0, 1)), displacement_rgb(field(0, -1))
    down, up = displacement_rgb(field(1, 0)), displacement_rgb(field(-1, 0))
    for img in (right, left, down, up):
        assert img.shape == (3, 4, 3) and img.dtype == np.uint8
        assert (img == img[0, 0]).all()  # a uniform field is one colour
        assert img.max() == 255  # full brightness: the longest vector of its own field
    assert right[0, 0].tolist() == [255, 0, 0]  # right = red
    assert left[0, 0].tolist() == [0, 255, 255]  # left = cyan, the opposite hue
    assert hue_of(left) == pytest.approx((hue_of(right) + 0.5) % 1, abs=0.01)
    assert hue_of(up) == pytest.approx((hue_of(down) + 0.5) % 1, abs=0.01)
    assert hue_of(down) == pytest.approx(0.25, abs=0.01)  # clockwise on screen (y down)
    # the hue depends on the direction only
    assert np.array_equal(displacement_rgb(field(0, 7.5)), right)


def test_displacement_rgb_brightness_is_magnitude_per_image():
    assert not displacement_rgb(np.zeros((2, 5, 6))).any()  # a zero field is black
    d = np.zeros((2, 1, 4))
    d[1, 0] = [0.0, 1.0, 2.0, 4.0]  # all pointing right, growing
    img = displacement_rgb(d)
    red = img[0, :, 0].astype(int)
    assert red.tolist() == [0, 64, 128, 255]  # brightness = |d| / max |d|
    assert (img[0, :, 1:] == 0).all()
    # normalised per field: scaling the whole field changes nothing
    assert np.array_equal(displacement_rgb(10 * d), img)
    # non-finite values count as zero, and the shape is checked
    d[1, 0, 0] = np.nan
    assert displacement_rgb(d)[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="2 x H x W"):
        displacement_rgb(np.zeros((3, 2, 2)))


def test_grey_and_strided_upsampling():
    g = grey_rgb(np.array([[0.0, 0.5, 1.0, 2.0]]))
    assert g.shape == (1, 4, 3) and g[0, :, 0].tolist() == [0, 128, 255, 255]
    assert (g[..., 0] == g[..., 2]).all()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    up = upsample_strided(x, 4, (7, 10))
    assert up.shape == (7, 10)
    assert up[1, 1] == x[0, 0] and up[5, 9] == pytest.approx(4.5, abs=1e-5)  # cell centres keep their value
    assert upsample_strided(np.ones((2, 3)), 4, (8, 12)).tolist() == np.ones((8, 12)).tolist()
    with pytest.raises(ValueError, match="does not cover"):
        upsample_strided(x, 4, (9, 12))


def test_displacement_field_is_the_reference_field():
    torch = pytest.importorskip("torch")
    from wsss.data.transforms import normalize
    from wsss.refine.irn import IRNMethod, displacement_field

    torch.manual_seed(0)
    m = IRNMethod("resnet18", pretrained="none", radius=5).eval()
    m.mean_shift.running_mean.copy_(torch.tensor([0.25, -0.5]))
    img = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    d = displacement_field(m, img, pad_to=64, device=torch.device("cpu"))
    assert d.shape == (2, 10, 13)
    # the reference (EdgeDisplacement): the unflipped image zero-padded to 64x64, the branch after
    # the mean shift, cropped to ceil(H/4) x ceil(W/4)
    x = torch.from_numpy(normalize(img).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        _, raw = m.branches(torch.nn.functional.pad(x, (0, 64 - 50, 0, 64 - 37)))
    want = raw[0, :, :10, :13] - torch.tensor([0.25, -0.5]).view(2, 1, 1)
    torch.testing.assert_close(d, want)
    # larger than pad_to: padded to a multiple of the output stride, as boundary_map does
    assert displacement_field(m, img, pad_to=0, device=torch.device("cpu")).shape == (2, 10, 13)


class FakeDS:
    """The part of the SegDataset interface the gallery uses: a few random images with masks."""

    def __init__(self, n=5, seed=0):
        rng = np.random.default_rng(seed)
        self.images, self.masks = {}, {}
        for i in range(n):
            h, w = int(rng.integers(30, 50)), int(rng.integers(30, 60))
            self.images[f"im{i}"] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            self.masks[f"im{i}"] = rng.choice(np.array([0, 1, 3, 255], np.uint8), (h, w))

    def ids(self, split):
        assert split == "val"
        return list(self.images)

    def load_image(self, image_id):
        return self.images[image_id]

    def load_mask(self, image_id):
        return self.masks[image_id]


def test_irn_gallery_end_to_end(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from PIL import Image

    import wsss.pipeline
    import wsss.viz
    from wsss.io import write_label_png
    from wsss.refine.irn import IRNMethod, save_irn
    from wsss.workflow.markers import write_shard_marker

    torch.manual_seed(0)
    model = save_irn(tmp_path / "model.pt", IRNMethod("resnet18", pretrained="none", radius=5), {"irn": {}})
    ds = FakeDS()
    monkeypatch.setattr(wsss.pipeline, "open_dataset", lambda cfg: ds)
    ids = ds.ids("val")
    skipped = {"im1"}  # left out upstream (no image-level label): never shown
    written = [i for i in ids if i not in skipped]
    masks = tmp_path / "masks"
    for i in written:
        write_label_png(masks / f"{i}.png", ds.load_mask(i) % 255)
    markers = []
    for k, part in enumerate((written[::2], written[1::2])):
        markers.append(str(tmp_path / f"shard-{k}.json"))
        write_shard_marker(markers[-1], kind="irn", ids=part, mask_dir=masks, resolved={}, skipped=sorted(skipped) * k)

    seen = {}
    real = wsss.viz.gallery

    def spy(rows, path, titles=None, row_labels=None, **kw):
        seen.update(rows=rows, titles=titles, row_labels=row_labels)
        real(rows, path, titles=titles, row_labels=row_labels, **kw)

    monkeypatch.setattr(wsss.viz, "gallery", spy)
    cfg = {"dataset": {"eval_split": "val"}, "irn": {"infer": {"pad_to": 0}}}
    out = tmp_path / "irn" / "gallery.png"
    wsss.pipeline.irn_gallery(cfg, str(model), markers, str(out), n_images=3)
    # the images mask_gallery shows: the same draw over the same stored ids
    pick = sorted(np.random.default_rng(0).choice(len(written), size=3, replace=False))
    assert seen["row_labels"] == [written[i] for i in pick]
    assert seen["titles"] == ["image", "ground truth", "IRN boundary", "IRN displacement", "IRN mask"]
    for image_id, row in zip(seen["row_labels"], seen["rows"]):
        img = ds.load_image(image_id)
        assert len(row) == 5 and all(t.shape == img.shape and t.dtype == np.uint8 for t in row)
        assert np.array_equal(row[0], img)
        assert (row[2][..., 0] == row[2][..., 1]).all() and (row[2][..., 1] == row[2][..., 2]).all()  # grey
        assert row[3].max() == 255  # the displacement uses the full brightness range of its image
    png = np.asarray(Image.open(out).convert("RGB"))
    tile = 160
    assert png.shape[1] == 5 * (tile + 4) + 4  # image | GT | boundary | displacement | mask
    assert png.shape[0] == 16 + 3 * (tile + 14 + 4) + 4  # titles + 3 captioned rows
