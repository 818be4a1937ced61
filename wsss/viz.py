"""Figures people would rather look at than read: CAM overlays and label-map galleries (PNG).

Drawn with numpy + PIL only (no matplotlib): a jet colour map for CAMs, the VOC palette for labels.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .io import atomic_path, voc_palette


def jet(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB with the classic jet colour map."""
    x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay_heatmap(img: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (img.astype(np.float32) * (1 - alpha) + jet(heat).astype(np.float32) * alpha).astype(np.uint8)


def overlay_labels(img: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Label map in palette colours over the image; 255 (ignore) drawn white, background untouched."""
    pal = voc_palette().astype(np.float32)
    pal[255] = 255
    col = pal[labels]
    a = np.where(labels[..., None] == 0, 0.0, alpha)
    return (img.astype(np.float32) * (1 - a) + col * a).astype(np.uint8)


def grey_rgb(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB grey levels (0 black, 1 white)."""
    g = (np.clip(np.nan_to_num(np.asarray(x, np.float32)), 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def upsample_strided(x: np.ndarray, stride: int, size: Tuple[int, int]) -> np.ndarray:
    """A float map at ``stride`` (``ceil(H/stride) × ceil(W/stride)``, as IRN's stride-4 outputs)
    bilinearly upsampled ``stride`` times and cropped to ``size`` = ``(H, W)``: each cell covers
    the ``stride × stride`` pixels it was computed for."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"upsample_strided needs a 2-d map, got shape {x.shape}")
    h, w = int(size[0]), int(size[1])
    if x.shape[0] * stride < h or x.shape[1] * stride < w:
        raise ValueError(f"a {x.shape} map at stride {stride} does not cover a {h}x{w} image")
    up = Image.fromarray(np.ascontiguousarray(x)).resize((x.shape[1] * stride, x.shape[0] * stride), Image.BILINEAR)
    return np.asarray(up, np.float32)[:h, :w]


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV (each in [0, 1]) -> float RGB in [0, 1], elementwise."""
    h6 = (np.asarray(h) % 1.0) * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1)


def displacement_rgb(disp: np.ndarray) -> np.ndarray:
    """A displacement field ``2 × H × W`` (``y, x``: IRN's channel order) -> uint8 ``H × W × 3``,
    drawn like an optical-flow picture: hue = direction, full saturation, brightness = magnitude
    divided by the largest magnitude of this field (so every image uses the full range).

    Hue (image coordinates, y down): pointing right = red, down = yellow-green, left = cyan, up =
    purple. A zero field is black; non-finite values count as zero.
    """
    d = np.nan_to_num(np.asarray(disp, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if d.ndim != 3 or d.shape[0] != 2:
        raise ValueError(f"displacement_rgb needs a 2 x H x W field (y, x), got shape {d.shape}")
    dy, dx = d
    mag = np.hypot(dx, dy)
    peak = float(mag.max()) if mag.size else 0.0
    v = mag / peak if peak > 0 else np.zeros_like(mag)
    hue = (np.arctan2(dy, dx) / (2 * np.pi)) % 1.0
    rgb = _hsv_to_rgb(hue, np.ones_like(v), v)
    return (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)


def _fit(tile: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(tile)
    im.thumbnail((size, size), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def gallery(
    rows: Sequence[Sequence[np.ndarray]],
    path,
    titles: Optional[Sequence[str]] = None,
    row_labels: Optional[Sequence[str]] = None,
    tile: int = 160,
) -> None:
    """Write a grid of RGB tiles (rows x columns) with optional column titles and row captions."""
    n_cols = max(len(r) for r in rows)
    head = 16 if titles else 0
    cap = 14 if row_labels else 0
    W, H = n_cols * (tile + 4) + 4, len(rows) * (tile + cap + 4) + head + 4
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if titles:
        for j, t in enumerate(titles):
            draw.text((4 + j * (tile + 4) + 2, 2), str(t), fill=(0, 0, 0))
    for i, row in enumerate(rows):
        y = head + 4 + i * (tile + cap + 4)
        for j, t in enumerate(row):
            canvas.paste(_fit(t, tile), (4 + j * (tile + 4), y))
        if row_labels:
            draw.text((6, y + tile + 1), str(row_labels[i])[: n_cols * tile // 6], fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def cam_overlay_rows(
    img: np.ndarray, gt: np.ndarray, high_res: np.ndarray, keys: Sequence[int], seed: np.ndarray, max_classes: int = 3
) -> List[np.ndarray]:
    """One gallery row: image, GT overlay, one CAM overlay per class (up to ``max_classes``), seed."""
    row = [img, overlay_labels(img, gt)]
    for k in range(min(len(keys), max_classes)):
        row.append(overlay_heatmap(img, high_res[k]))
    row += [np.full_like(img, 255)] * (max_classes - min(len(keys), max_classes))
    row.append(overlay_labels(img, seed))
    return row


CURVE_COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def plot_curves(series: dict, path, title: str = "", size=(640, 360), xlabel: str = "step") -> None:
    """Line plot of named series (name -> (x, y) arrays) with axes and a legend, drawn with PIL."""
    W, H = size
    left, right, top, bottom = 56, 150, 24, 30
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    xs = [np.asarray(x, float) for x, _ in series.values() if len(x)]
    ys = [np.asarray(y, float) for _, y in series.values() if len(y)]
    ys_f = np.concatenate([y[np.isfinite(y)] for y in ys]) if ys else np.zeros(1)
    x0, x1 = (min(x.min() for x in xs), max(x.max() for x in xs)) if xs else (0.0, 1.0)
    y0, y1 = (float(ys_f.min()), float(ys_f.max())) if ys_f.size else (0.0, 1.0)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    pw, ph = W - left - right, H - top - bottom

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph

    draw.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        draw.text((4, px(x0, yv)[1] - 6), f"{yv:.3g}", fill=(0, 0, 0))
        xv = x0 + frac * (x1 - x0)
        draw.text((px(xv, y0)[0] - 10, top + ph + 6), f"{xv:.0f}", fill=(0, 0, 0))
    draw.text((left + pw // 2 - 10, H - 14), xlabel, fill=(0, 0, 0))
    draw.text((left, 4), title, fill=(0, 0, 0))
    for i, (name, (x, y)) in enumerate(series.items()):
        col = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        pts = [px(a, b) for a, b in zip(np.asarray(x, float), np.asarray(y, float)) if np.isfinite(b)]
        if len(pts) > 1:
            draw.line(pts, fill=col, width=2)
        draw.line([(W - right + 8, top + 8 + 14 * i), (W - right + 24, top + 8 + 14 * i)], fill=col, width=3)
        draw.text((W - right + 28, top + 2 + 14 * i), str(name)[:18], fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def training_curves(log_csv, path, title: str = "", smooth: int = 10) -> None:
    """Loss terms (moving average over ``smooth`` steps) of a train_log.csv written by the engine."""
    import pandas as pd

    df = pd.read_csv(log_csv)
    if df.empty:
        raise ValueError(f"training log {log_csv} has no rows")
    series = {}
    for c in df.columns:
        if c.startswith("loss_"):
            y = df[c].rolling(max(1, smooth), min_periods=1).mean().to_numpy()
            series[c[len("loss_") :]] = (df["step"].to_numpy(), y)
    plot_curves(series, path, title=title)
