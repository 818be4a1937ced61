"""Dataset statistics (a tidy CSV) and a ground-truth overlay montage, for any :class:`SegDataset`.

``stats.csv`` has one row per number, columns ``section, split, key, value``:

=====================  ===========================================================================
section                keys and values
=====================  ===========================================================================
``images``             ``count`` (ids in the split), ``with_mask``, ``missing_mask``,
                       ``mean_height``, ``mean_width``
``class_images``       class name -> number of images whose mask contains the class
``class_pixel_freq``   class name -> fraction of the split's non-ignored pixels with that class
``classes_per_image``  ``"k"`` -> number of images with k foreground classes
``object_size``        size bin (e.g. ``"0.01-0.05"``) -> number of (image, foreground class) pairs
                       whose area covers that fraction of the image (no connected components)
``ignore``             ``fraction`` (ignored / all pixels), ``pixels_ignored``, ``pixels_total``
=====================  ===========================================================================

Images are read once even when they appear in several splits.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from ..io import DataError, atomic_path
from ..viz import overlay_labels
from .base import SegDataset

log = logging.getLogger(__name__)

#: Bin edges of the per-(image, class) area fraction histogram.
SIZE_BINS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)

#: Montage layout: each tile is ``tile`` x ``tile`` pixels of image plus a caption strip of
#: ``CAPTION_LINES`` lines of ``LINE_HEIGHT`` pixels (image id, then class names).
CAPTION_LINES = 3
LINE_HEIGHT = 12
CAPTION_PAD = 4
OVERLAY_ALPHA = 0.5  # ground truth drawn with wsss.viz.overlay_labels (palette colours, void white)

COLUMNS = ["section", "split", "key", "value"]


def _bin_labels(bins: Sequence[float] = SIZE_BINS) -> List[str]:
    return [f"{a:g}-{b:g}" for a, b in zip(bins[:-1], bins[1:])]


def _summarise(ds: SegDataset, image_id: str) -> Dict[str, object]:
    mask = ds.load_mask(image_id)
    return {"counts": np.bincount(mask.ravel(), minlength=256), "shape": mask.shape}


def _summaries(ds: SegDataset, ids: Sequence[str], on_missing: str, progress: bool) -> Dict[str, Optional[dict]]:
    from tqdm import tqdm

    out: Dict[str, Optional[dict]] = {}
    for image_id in tqdm(ids, desc="dataset stats", unit="img", disable=not progress, mininterval=1.0):
        if on_missing == "skip" and not Path(ds.mask_path(image_id)).exists():
            out[image_id] = None
            continue
        out[image_id] = _summarise(ds, image_id)
    return out


def _union(ds: SegDataset, splits: Sequence[str]) -> List[str]:
    seen: Dict[str, None] = {}
    for s in splits:
        for i in ds.ids(s):
            seen.setdefault(i, None)
    return list(seen)


def dataset_stats(ds: SegDataset, splits: Sequence[str], on_missing: str = "skip",
                  progress: bool = True) -> pd.DataFrame:
    """Statistics of ``splits`` of ``ds`` as a long DataFrame (``section, split, key, value``).

    ``on_missing``: ``"skip"`` counts images without a mask file (e.g. VOC ``train_aug`` read with
    ``SegmentationClass``) in ``images/missing_mask`` and leaves them out of the other numbers;
    ``"error"`` raises :class:`DataError`.
    """
    if on_missing not in ("skip", "error"):
        raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
    splits = list(splits)
    summaries = _summaries(ds, _union(ds, splits), on_missing, progress)
    names = list(ds.class_names)
    n_cls = len(names)
    labels = _bin_labels()
    rows: List[Tuple[str, str, str, object]] = []
    for split in splits:
        ids = ds.ids(split)
        present = [summaries[i] for i in ids if summaries[i] is not None]
        missing = len(ids) - len(present)
        if missing:
            log.warning("split %s: %d of %d images have no mask file; left out of the statistics",
                        split, missing, len(ids))
        rows.append(("images", split, "count", len(ids)))
        rows.append(("images", split, "with_mask", len(present)))
        rows.append(("images", split, "missing_mask", missing))
        heights = [s["shape"][0] for s in present]
        widths = [s["shape"][1] for s in present]
        rows.append(("images", split, "mean_height", float(np.mean(heights)) if heights else float("nan")))
        rows.append(("images", split, "mean_width", float(np.mean(widths)) if widths else float("nan")))

        counts = np.stack([s["counts"] for s in present]) if present else np.zeros((0, 256), np.int64)
        cls_counts = counts[:, :n_cls]
        for c, name in enumerate(names):
            rows.append(("class_images", split, name, int((cls_counts[:, c] > 0).sum())))
        labelled = int(cls_counts.sum())
        totals = cls_counts.sum(axis=0)
        for c, name in enumerate(names):
            rows.append(("class_pixel_freq", split, name, float(totals[c] / labelled) if labelled else 0.0))

        k_per_image = (cls_counts[:, 1:] > 0).sum(axis=1)
        hist = np.bincount(k_per_image, minlength=2) if len(present) else np.zeros(2, np.int64)
        for k, v in enumerate(hist):
            rows.append(("classes_per_image", split, str(k), int(v)))

        pixels = np.array([s["shape"][0] * s["shape"][1] for s in present], dtype=np.float64)
        frac = cls_counts[:, 1:] / pixels[:, None] if len(present) else np.zeros((0, n_cls - 1))
        sizes = frac[cls_counts[:, 1:] > 0]
        idx = np.clip(np.searchsorted(SIZE_BINS, sizes, side="right") - 1, 0, len(labels) - 1)
        size_hist = np.bincount(idx, minlength=len(labels))
        for label, v in zip(labels, size_hist):
            rows.append(("object_size", split, label, int(v)))

        total = int(pixels.sum())
        ignored = int(counts[:, 255].sum())
        rows.append(("ignore", split, "fraction", ignored / total if total else 0.0))
        rows.append(("ignore", split, "pixels_ignored", ignored))
        rows.append(("ignore", split, "pixels_total", total))
    df = pd.DataFrame([r[:3] for r in rows], columns=COLUMNS[:3])
    df["value"] = pd.Series([r[3] for r in rows], dtype=object)  # counts stay integers in the CSV
    return df


# --------------------------------------------------------------------------------------------
# Montage


def montage_size(n: int, tile: int = 160) -> Tuple[int, int]:
    """(width, height) of a montage of ``n`` tiles: ceil(sqrt(n)) columns."""
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    return cols * tile, rows * (tile + CAPTION_LINES * LINE_HEIGHT + CAPTION_PAD)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: ImageDraw.ImageDraw, words: Sequence[str], font, width: int, lines: int) -> List[str]:
    out: List[str] = []
    cur = ""
    for w in words:
        trial = f"{cur}, {w}" if cur else w
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            out.append(cur + ",")
            cur = w
    if cur:
        out.append(cur)
    if len(out) > lines:
        out = out[: lines - 1] + [out[lines - 1].rstrip(",") + " ..."]
    return [_fit(draw, line, font, width) for line in out[:lines]]


def _tile(ds: SegDataset, image_id: str, tile: int, font) -> Image.Image:
    image = ds.load_image(image_id)
    mask = ds.load_mask(image_id)
    if image.shape[:2] != mask.shape:
        raise DataError(f"image {image_id!r}: image {image.shape[:2]} and mask {mask.shape} differ in size")
    vis = Image.fromarray(overlay_labels(image, mask, alpha=OVERLAY_ALPHA))
    h, w = mask.shape
    scale = tile / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    vis = vis.resize((nw, nh), Image.BILINEAR)
    cap = CAPTION_LINES * LINE_HEIGHT + CAPTION_PAD
    cell = Image.new("RGB", (tile, tile + cap), (255, 255, 255))
    cell.paste(Image.new("RGB", (tile, tile), (128, 128, 128)), (0, 0))
    cell.paste(vis, ((tile - nw) // 2, (tile - nh) // 2))
    draw = ImageDraw.Draw(cell)
    draw.rectangle([0, 0, tile - 1, tile + cap - 1], outline=(255, 255, 255))
    present = [ds.class_names[c] for c in np.unique(mask) if 0 < c < ds.num_classes]
    lines = [_fit(draw, image_id, font, tile - 4)] + _wrap(draw, present or ["(background only)"], font,
                                                            tile - 4, CAPTION_LINES - 1)
    for k, line in enumerate(lines):
        draw.text((2, tile + 2 + k * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    return cell


def make_montage(ds: SegDataset, ids: Sequence[str], tile: int = 160) -> Image.Image:
    """A grid of ``ids`` with ground truth overlaid (palette colours, alpha 0.5) and class names."""
    font = ImageFont.load_default()
    width, height = montage_size(len(ids), tile)
    cols = width // tile
    cell_h = tile + CAPTION_LINES * LINE_HEIGHT + CAPTION_PAD
    out = Image.new("RGB", (width, height), (255, 255, 255))
    for k, image_id in enumerate(ids):
        out.paste(_tile(ds, image_id, tile, font), ((k % cols) * tile, (k // cols) * cell_h))
    return out


def montage_ids(ds: SegDataset, splits: Sequence[str], n: int, seed: int = 0) -> List[str]:
    """``n`` ids drawn without replacement (seeded) from the splits' images that have a mask."""
    ids = [i for i in _union(ds, splits) if Path(ds.mask_path(i)).exists()]
    if not ids:
        return []
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(ids), size=min(n, len(ids)), replace=False))
    return [ids[i] for i in pick]


def write_stats(ds: SegDataset, splits: Sequence[str], csv_path: str | Path, montage_path: str | Path,
                n_montage: int = 16, seed: int = 0, tile: int = 160, on_missing: str = "skip",
                progress: bool = True, provenance: Optional[Mapping[str, Any]] = None) -> pd.DataFrame:
    """Write ``stats.csv`` (see module doc) and a ground-truth montage PNG, both atomically.

    ``provenance`` (e.g. package version, config hash) is appended as rows of section ``provenance``.
    """
    df = dataset_stats(ds, splits, on_missing=on_missing, progress=progress)
    if provenance:
        rows = [{"section": "provenance", "split": "", "key": k, "value": v} for k, v in provenance.items()]
        df = pd.concat([df, pd.DataFrame(rows)], ignore_index=True)
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    ids = montage_ids(ds, splits, n_montage, seed)
    if not ids:
        raise DataError(f"no image of splits {list(splits)} has a mask; cannot draw a montage")
    image = make_montage(ds, ids, tile)
    with atomic_path(montage_path) as tmp:
        image.save(tmp, format="PNG")
    log.info("dataset stats of %s written to %s, montage of %d images to %s", list(splits), csv_path, len(ids),
             montage_path)
    return df
