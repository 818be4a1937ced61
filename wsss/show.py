"""One image through the pipeline as a single PNG (``wsss show``): image, ground truth, CAM, seeds,
CRF, IR labels, IRN and DeepLab masks of one run, each panel present only if its output exists.

Outputs are found the way the stages find them: CAMs in ``<run>/cams/shard-*.h5``
(:class:`wsss.cams.CamStore`), masks through the shard markers of ``<run>/seeds/masks``, ``crf``,
``irn/ir_labels``, ``irn/masks``, ``affinitynet/masks`` and ``deeplab/predictions`` (the marker
names the mask folder and the ids it wrote). Where shards of several runs of a stage lie side by side (another shard count),
the newest marker or shard holding the image wins. Without seed masks (a run stopped after
``seed_eval``), the seeds are recomputed from the CAM at the threshold chosen in
``seeds/threshold_sweep.csv``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .io import DataError
from .workflow.markers import read_shard_markers_full

#: (panel title, mask folder under the run) of the mask panels, in pipeline order
MASK_PANELS: Tuple[Tuple[str, str], ...] = (
    ("seeds", "seeds/masks"),
    ("CRF", "crf"),
    ("IR labels", "irn/ir_labels"),
    ("IRN", "irn/masks"),
    ("AffinityNet", "affinitynet/masks"),
    ("DeepLab", "deeplab/predictions"),
)


class ShowError(ValueError):
    """The image or run cannot be shown; the message names what is missing."""


@dataclass
class Panel:
    title: str
    tile: np.ndarray  # H x W x 3 uint8


@dataclass
class ImagePanels:
    image_id: str
    panels: List[Panel]
    notes: List[str] = field(default_factory=list)  # outputs looked for and not used, and why

    @property
    def titles(self) -> List[str]:
        return [p.title for p in self.panels]


def _newest_first(paths: Sequence[Path]) -> List[Path]:
    return sorted(paths, key=lambda p: (p.stat().st_mtime_ns, str(p)), reverse=True)


def find_mask(folder: Path, image_id: str) -> Tuple[Optional[Path], str]:
    """The mask PNG of ``image_id`` written by the shard jobs whose markers lie in ``folder``, and
    a note when there is none (empty: no markers at all)."""
    markers = _newest_first(list(folder.glob("shard-*.json")))
    if not markers:
        return None, ""
    skipped = False
    unreadable = []
    for m in markers:
        try:
            mask_dir, ids, skip = read_shard_markers_full([m])
        except (DataError, ValueError) as e:  # a damaged marker: look at the others, say so
            unreadable.append(f"{m.name} ({e})")
            continue
        if image_id in ids:
            # the folder is always the marker's sibling (masks-<hash>); the recorded path is relative
            # to where Snakemake ran, so prefer the sibling
            for d in (m.parent / mask_dir.name, mask_dir):
                if (d / f"{image_id}.png").exists():
                    return d / f"{image_id}.png", ""
            return None, f"{folder}: marker {m.name} lists {image_id!r} but {mask_dir.name}/{image_id}.png is missing"
        skipped |= image_id in skip
    if skipped:
        return None, f"{folder}: {image_id!r} skipped by the stage (no image-level label)"
    if unreadable:
        return None, f"{folder}: {image_id!r} is in none of its readable shards; unreadable: {'; '.join(unreadable)}"
    return None, f"{folder}: {image_id!r} is in none of its shards"


def find_cam(cam_dir: Path, image_id: str):
    """``(CamRecord or None, note)`` of ``image_id`` from the newest CAM shard holding it."""
    from .cams import CamStore

    shards = _newest_first(list(cam_dir.glob("shard-*.h5")))
    if not shards:
        return None, ""
    skipped, unreadable = False, []
    for p in shards:
        try:
            store = CamStore([p])
        except (DataError, ValueError, OSError) as e:  # damaged or incomplete: look at the others, say so
            unreadable.append(f"{p.name} ({e})")
            continue
        with store:
            if image_id in store:
                return store.get(image_id, fields=("keys", "high_res")), ""
            skipped |= image_id in store.skipped
    if skipped:
        return None, f"{cam_dir}: {image_id!r} skipped by the CAM stage (no image-level label)"
    if unreadable:
        return None, f"{cam_dir}: {image_id!r} is in none of its readable shards; unreadable: {'; '.join(unreadable)}"
    return None, f"{cam_dir}: {image_id!r} is in none of its shards"


def check_image_id(ds, image_id: str) -> None:
    """Raise :class:`ShowError` naming ``image_id`` unless the dataset has it (in a split, or as
    an image file)."""
    if not isinstance(image_id, str) or not image_id or "/" in image_id or image_id in (".", ".."):
        raise ShowError(f"invalid image id {image_id!r}")
    splits = list(ds.splits())
    for s in splits:
        if image_id in set(ds.ids(s)):
            return
    try:
        if Path(ds.image_path(image_id)).is_file():
            return
    except (KeyError, ValueError, DataError):
        pass
    raise ShowError(
        f"unknown image id {image_id!r}: not in any split of the dataset at {ds.root} "
        f"({', '.join(splits)}) and no image file for it"
    )


def image_panels(ds, run_dir: str | os.PathLike, image_id: str, per_class: bool = False) -> ImagePanels:
    """The panels of ``image_id`` for the run folder ``run_dir`` (``results/<dataset>/<experiment>/s<seed>``).

    ``per_class``: one CAM panel per class present in the image (titled with its name) instead of
    their maximum (titled ``CAM (max of K)``; with one class the panel is that class's).
    Raises :class:`ShowError` for an image id the dataset does not have.
    """
    from .viz import overlay_heatmap, overlay_labels

    run_dir = Path(run_dir)
    check_image_id(ds, image_id)
    img = ds.load_image(image_id)
    shape = img.shape[:2]
    out = ImagePanels(image_id, [Panel("image", img)])
    names = list(ds.class_names)

    def add_labels(title: str, labels: np.ndarray, source: Any) -> None:
        if labels.shape != shape:
            out.notes.append(
                f"{source}: {labels.shape[1]}x{labels.shape[0]}, the image is {shape[1]}x{shape[0]}; not shown"
            )
            return
        out.panels.append(Panel(title, overlay_labels(img, labels)))

    try:
        add_labels("ground truth", ds.load_mask(image_id), "ground truth")
    except (DataError, FileNotFoundError, KeyError) as e:
        out.notes.append(f"ground truth: {e}")

    rec, note = find_cam(run_dir / "cams", image_id)
    if note:
        out.notes.append(note)
    if rec is not None:
        hr = rec.high_res
        if hr.shape[1:] != shape:
            out.notes.append(
                f"CAM of {image_id!r}: {hr.shape[2]}x{hr.shape[1]}, the image is {shape[1]}x{shape[0]}; not shown"
            )
            rec = None
        elif len(rec.keys) == 0:
            out.notes.append(f"CAM of {image_id!r}: no class present, no map")
        elif per_class or len(rec.keys) == 1:
            for k, plane in zip(rec.keys, hr):
                out.panels.append(Panel(f"CAM {names[int(k) + 1]}", overlay_heatmap(img, plane)))
        else:
            out.panels.append(Panel(f"CAM (max of {len(rec.keys)})", overlay_heatmap(img, hr.max(0))))

    for title, folder in MASK_PANELS:
        path, note = find_mask(run_dir / folder, image_id)
        if note:
            out.notes.append(note)
        if path is not None:
            from .io import read_label_png

            add_labels(title, read_label_png(path), path)
        elif title == "seeds" and rec is not None and (run_dir / "seeds" / "threshold_sweep.csv").exists():
            from .seeds import cam_to_label, chosen_threshold

            t = chosen_threshold(run_dir / "seeds" / "threshold_sweep.csv")
            add_labels(f"seeds (t={t:g})", cam_to_label(rec.high_res, rec.keys, t), "seeds")
    return out


def write_image_panel(
    ds,
    run_dir: str | os.PathLike,
    image_id: str,
    out_png: str | os.PathLike,
    per_class: bool = False,
    tile: int = 256,
    caption: Optional[str] = None,
) -> ImagePanels:
    """Write the panels of :func:`image_panels` side by side into ``out_png`` (atomically, via
    :func:`wsss.viz.gallery`); returns them (``.titles``, ``.notes``)."""
    from .viz import gallery

    panels = image_panels(ds, run_dir, image_id, per_class=per_class)
    if caption is None:
        caption = f"{image_id} - {run_dir}"
    gallery(
        [[_enlarged(p.tile, tile) for p in panels.panels]],
        out_png,
        titles=panels.titles,
        row_labels=[caption],
        tile=tile,
    )
    return panels


def _enlarged(tile: np.ndarray, size: int) -> np.ndarray:
    """``tile`` scaled up (nearest neighbour: label edges stay crisp) so its long side is ``size``;
    the gallery only scales down, and a small image would be a speck in a large panel."""
    h, w = tile.shape[:2]
    if max(h, w) >= size:
        return tile
    from PIL import Image

    f = size / max(h, w)
    return np.asarray(Image.fromarray(tile).resize((max(1, round(w * f)), max(1, round(h * f))), Image.NEAREST))


# ----------------------------------------------------------------------------------------------
# finding the run and the dataset from a results folder


def dataset_tags(results: str | os.PathLike) -> List[str]:
    """Dataset folders under ``results`` (``results/logs`` left out)."""
    results = Path(results)
    if not results.is_dir():
        return []
    return sorted(d.name for d in results.iterdir() if d.is_dir() and d.name != "logs" and not d.name.startswith("."))


def runs_in(results_dataset: str | os.PathLike) -> List[str]:
    """Runs (``<experiment>/s<seed>``) under ``results/<dataset>``."""
    base = Path(results_dataset)
    if not base.is_dir():
        return []
    return sorted(
        f"{e.name}/{s.name}"
        for e in base.iterdir()
        if e.is_dir()
        for s in e.iterdir()
        if s.is_dir() and s.name[:1] == "s" and s.name[1:].isdigit()
    )


def recorded_config(run_dir: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The config an output of ``run_dir`` records (every one holds the data sections, so the
    dataset can be opened from it): a CAM shard's ``config_json``, a shard marker's ``config``, or
    a model file's ``config``; None when none is readable."""
    run_dir = Path(run_dir)
    for p in sorted(run_dir.glob("cams/shard-*.h5")):
        try:
            import h5py

            with h5py.File(p, "r") as f:
                return json.loads(f.attrs["config_json"])
        except (OSError, KeyError, ValueError):
            continue
    for p in sorted(run_dir.glob("**/shard-*.json")):
        try:
            cfg = json.loads(p.read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(cfg, Mapping) and "dataset" in cfg:
            return dict(cfg)
    from .status import read_checkpoint_metadata

    for p in sorted(run_dir.glob("*/model.pt")):
        try:
            cfg = read_checkpoint_metadata(p).get("config")
        except Exception:  # noqa: BLE001 - any unreadable file: try the next
            continue
        if isinstance(cfg, Mapping) and "dataset" in cfg:
            return dict(cfg)
    return None
