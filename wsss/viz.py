"""Figures people would rather look at than read: CAM overlays and label-map galleries (PNG).

Drawn with numpy + PIL only (no matplotlib): a jet colour map for CAMs, the VOC palette for labels.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

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


def _fit(tile: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(tile)
    im.thumbnail((size, size), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def gallery(rows: Sequence[Sequence[np.ndarray]], path, titles: Optional[Sequence[str]] = None, row_labels: Optional[Sequence[str]] = None, tile: int = 160) -> None:
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


def cam_overlay_rows(img: np.ndarray, gt: np.ndarray, high_res: np.ndarray, keys: Sequence[int], seed: np.ndarray, max_classes: int = 3) -> List[np.ndarray]:
    """One gallery row: image, GT overlay, one CAM overlay per class (up to ``max_classes``), seed."""
    row = [img, overlay_labels(img, gt)]
    for k in range(min(len(keys), max_classes)):
        row.append(overlay_heatmap(img, high_res[k]))
    row += [np.full_like(img, 255)] * (max_classes - min(len(keys), max_classes))
    row.append(overlay_labels(img, seed))
    return row
