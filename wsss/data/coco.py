"""MS COCO 2014 for weakly supervised semantic segmentation.

COCO has no semantic label maps; WSSS papers convert the *instance* annotations into them (BECO
``first-stage/irn/mscoco/annToMask.py``, KTSE ``COCOSegmentation14``). This module does that
without pycocotools and reads the result through the :class:`~wsss.data.base.SegDataset` interface.

Conventions (fixed here, recorded in ``<root>/mask/.complete``):

* **Classes.** 81: ``background`` (0) + the 80 COCO categories in category-id order. The ids
  1..90 with gaps are mapped to 1..80 (:data:`COCO_ID_TO_CONTIGUOUS`; e.g. 13 'stop sign' -> 12,
  90 'toothbrush' -> 80). The annotation file's ``categories`` must equal :data:`COCO_CATEGORIES`.
* **Painting order.** Every non-crowd instance is painted with its class in the order its
  annotation appears in the json's ``annotations`` array; a later annotation overwrites an earlier
  one where they overlap (BECO: ``for ann in anns: mask[annToMask(ann) == 1] = cat``).
* **Crowd.** ``crowd="background"`` (BECO, the default): crowd annotations are skipped, their
  regions stay 0. ``crowd="ignore"``: crowd pixels not covered by a non-crowd instance become 255.
* **Image-level labels** come from the categories of the image's *non-crowd* annotations, even
  when an instance ends up with no pixels (zero-area polygon, fully overwritten); the label CSV is
  therefore the authority, and :meth:`COCODataset.labels` derives labels from the mask only when the
  CSV is missing.
* **Images without annotations** (about 1% of COCO 2014) get an all-background mask and an empty
  label vector; the stats count them. Downstream training skips images with no labels, as IRN and
  BECO do (a classifier cannot learn from an all-zero target), while evaluation keeps them.
* **Layout.** ``<root>/{train2014,val2014}/COCO_{split}2014_<12-digit id>.jpg`` (as extracted from the
  official zips), ``<root>/mask/{train2014,val2014}/<int id>.png`` (palette PNG, VOC colours, no zero
  padding), ``<root>/lists/{train,val}.txt`` (integer ids as strings, ascending) and
  ``<root>/lists/{train,val}_labels.csv``.

Segmentations come in three forms, all decoded here in numpy (:func:`segmentation_to_mask`):
polygons (rasterised with PIL, see :func:`polygons_to_mask` for the sub-pixel convention),
uncompressed RLE (``counts`` a list of ints) and compressed RLE (``counts`` a string, decoded as
pycocotools' ``rleFrString`` does). RLE runs are column-major (Fortran order), starting with a run
of zeros, as COCO defines them.

Run ``python -m wsss.data.coco ROOT --crowd background`` after extracting the images and
``annotations_trainval2014.zip`` under ROOT. Loading ``instances_train2014.json`` takes a few GB
of memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..io import DataError, voc_palette, write_json_atomic, write_label_png, write_text_atomic
from .base import SegDataset, labels_from_mask, read_id_list, read_labels_csv, write_labels_csv

# (COCO category id, name) for the 80 "thing" categories of instances_{train,val}2014.json.
COCO_CATEGORIES: Tuple[Tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"),
    (6, "bus"), (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"),
    (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"),
    (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"),
    (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"),
    (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"),
    (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"),
    (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"),
    (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"),
    (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"),
    (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"),
    (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"),
    (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CATEGORY_IDS: Tuple[int, ...] = tuple(i for i, _ in COCO_CATEGORIES)
COCO_CLASSES: List[str] = ["background"] + [n for _, n in COCO_CATEGORIES]
COCO_ID_TO_CONTIGUOUS: Dict[int, int] = {cid: k + 1 for k, cid in enumerate(COCO_CATEGORY_IDS)}

CROWD_POLICIES = ("background", "ignore")
SPLITS = ("train", "val")
IGNORE = 255
MARKER_NAME = ".complete"

# Polygon rasterisation: vertices are rounded to a 1/_POLY_UPSAMPLE pixel grid, as pycocotools'
# rleFrPoly does (scale=5).
_POLY_UPSAMPLE = 5


# ---------------------------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------------------------


def category_map(categories: Sequence[Mapping[str, Any]], source: str | Path = "annotation file") -> Dict[int, int]:
    """Map COCO category ids to contiguous 1..80 from a json ``categories`` list.

    The list (in any order) must hold exactly the (id, name) pairs of :data:`COCO_CATEGORIES`;
    otherwise :class:`DataError` names ``source`` and the differences.
    """
    try:
        pairs = [(int(c["id"]), str(c["name"])) for c in categories]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{source}: malformed 'categories' entry ({e!r}); each needs 'id' and 'name'") from e
    expected = set(COCO_CATEGORIES)
    got = set(pairs)
    if len(pairs) != len(got) or got != expected:
        dup = sorted({p for p in pairs if pairs.count(p) > 1})
        missing = sorted(expected - got)
        unexpected = sorted(got - expected)
        raise DataError(
            f"{source}: 'categories' does not match the 80 COCO 2014 categories "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            f"{f', duplicated {dup[:5]}' if dup else ''})"
        )
    return {cid: k + 1 for k, cid in enumerate(sorted(cid for cid, _ in pairs))}


# ---------------------------------------------------------------------------------------------
# Segmentation decoding
# ---------------------------------------------------------------------------------------------


def rle_string_to_counts(s: str | bytes) -> List[int]:
    """Decode a compressed COCO RLE string into run lengths, exactly as maskApi ``rleFrString``.

    Each count is written in 5-bit chunks, least significant first, as characters ``chunk + 48``;
    bit 0x20 of a chunk says another chunk follows, bit 0x10 of the last chunk is the sign.
    From the fourth count on (index > 2) the stored value is the difference to the count two
    places earlier.
    """
    if isinstance(s, (bytes, bytearray)):
        s = s.decode("ascii")
    counts: List[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError(f"compressed RLE string ends inside a count (at character {p})")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {s[p]!r} at {p} in compressed RLE string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_counts_to_mask(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """Expand COCO run lengths (alternating 0/1 runs, starting with 0, column-major) to a bool HxW mask."""
    cnt = np.asarray(counts, dtype=np.int64)
    if cnt.ndim != 1:
        raise ValueError("RLE counts must be a flat list of integers")
    if (cnt < 0).any():
        raise ValueError(f"RLE has a negative run length {int(cnt.min())}")
    total = int(cnt.sum())
    if total != height * width:
        raise ValueError(f"RLE run lengths sum to {total}, expected height*width = {height}*{width} = {height * width}")
    values = np.zeros(len(cnt), dtype=bool)
    values[1::2] = True
    return np.repeat(values, cnt).reshape((height, width), order="F")


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (flat ``[x1, y1, x2, y2, ...]`` lists; union of parts) to bool HxW.

    Sub-pixel convention (that of COCO and pycocotools' ``rleFrPoly``): pixel (row i, column j)
    covers [j, j+1) x [i, i+1) in the continuous coordinates of the polygon and belongs to it iff
    its centre (j + 0.5, i + 0.5) lies inside, after each vertex is rounded to the 1/5-pixel grid
    (``round(5 v) / 5``). So the rectangle with corners (x0, y0), (x1, y1) on integer coordinates
    covers exactly columns x0..x1-1 and rows y0..y1-1 (as pycocotools, which makes a box's area
    w*h). A plain ``ImageDraw.polygon`` at image resolution would instead truncate vertices to
    integers and include both edges (one extra row and column).

    Implementation: PIL fills closed polygons with integer vertices including the boundary. The
    polygon is drawn on an 'L' canvas 10x finer than the image (vertices at the even coordinates
    ``2 * round(5 v)``, canvas limited to the polygon's bounding box) and read at the odd sample
    points ``10 j + 5`` (the pixel centres, via a NEAREST resize), which never lie on an
    axis-parallel edge. Slanted edges
    can differ from pycocotools by PIL's and pycocotools' own line rounding (<= 0.1 pixel).
    Polygons with fewer than 3 vertices have no area and are skipped.
    """
    mask = np.zeros((height, width), dtype=bool)
    s = 2 * _POLY_UPSAMPLE
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64)
        if xy.ndim != 1 or xy.size % 2:
            raise ValueError(f"polygon must be a flat list of x, y pairs, got {xy.size} numbers")
        if xy.size < 6:
            continue
        xy = xy.reshape(-1, 2)
        if not np.isfinite(xy).all():
            raise ValueError("polygon has non-finite coordinates")
        # pixel columns/rows whose centre can fall inside (one pixel margin for rounding)
        j0 = max(int(np.floor(xy[:, 0].min())) - 1, 0)
        j1 = min(int(np.ceil(xy[:, 0].max())) + 1, width)
        i0 = max(int(np.floor(xy[:, 1].min())) - 1, 0)
        i1 = min(int(np.ceil(xy[:, 1].max())) + 1, height)
        if j1 <= j0 or i1 <= i0:
            continue
        up = 2 * np.floor(_POLY_UPSAMPLE * xy + 0.5).astype(np.int64) - np.array([s * j0, s * i0])
        canvas = Image.new("L", (s * (j1 - j0), s * (i1 - i0)), 0)
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in up.tolist()], fill=1)
        # NEAREST resize by 1/s reads source pixel s*j + s//2: the same as [s//2::s, s//2::s] slicing,
        # without converting the large canvas to numpy first
        mask[i0:i1, j0:j1] |= np.asarray(canvas.resize((j1 - j0, i1 - i0), Image.NEAREST), dtype=bool)
    return mask


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode one annotation's ``segmentation`` (polygons, uncompressed or compressed RLE) to bool HxW."""
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, Mapping) and "counts" in segmentation and "size" in segmentation:
        h, w = (int(v) for v in segmentation["size"])
        if (h, w) != (height, width):
            raise ValueError(f"RLE size {[h, w]} differs from the image size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, (str, bytes, bytearray)):
            counts = rle_string_to_counts(counts)
        return rle_counts_to_mask(counts, h, w)
    raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")


# ---------------------------------------------------------------------------------------------
# Semantic masks
# ---------------------------------------------------------------------------------------------


def _check_crowd(crowd: str) -> None:
    if crowd not in CROWD_POLICIES:
        raise ValueError(f"crowd policy must be one of {list(CROWD_POLICIES)}, got {crowd!r}")


def _class_of(ann: Mapping[str, Any], cat_map: Mapping[int, int]) -> int:
    try:
        return cat_map[int(ann["category_id"])]
    except KeyError:
        raise DataError(
            f"annotation {ann.get('id')} of image {ann.get('image_id')} has unknown category_id "
            f"{ann.get('category_id')!r}"
        ) from None


def _is_crowd(ann: Mapping[str, Any]) -> bool:
    return bool(ann.get("iscrowd", 0))


def build_semantic_mask(
    image_info: Mapping[str, Any],
    annotations: Iterable[Mapping[str, Any]],
    cat_map: Mapping[int, int],
    crowd: str = "background",
) -> np.ndarray:
    """Paint an image's instance annotations into a uint8 HxW class map (0 bg, 1..80, 255 ignore).

    Non-crowd instances are painted in the given order (the json's order), a later one
    overwriting an earlier one. Crowd annotations are skipped (``crowd="background"``) or their
    pixels not covered by any non-crowd instance set to 255 (``crowd="ignore"``).
    """
    _check_crowd(crowd)
    h, w = int(image_info["height"]), int(image_info["width"])
    sem = np.zeros((h, w), dtype=np.uint8)
    crowd_px = np.zeros((h, w), dtype=bool) if crowd == "ignore" else None
    for ann in annotations:
        is_crowd = _is_crowd(ann)
        if is_crowd and crowd_px is None:
            continue
        cls = _class_of(ann, cat_map)
        try:
            m = segmentation_to_mask(ann["segmentation"], h, w)
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(
                f"annotation {ann.get('id')} of image {image_info.get('id')}: bad segmentation ({e})"
            ) from e
        if is_crowd:
            crowd_px |= m
        else:
            sem[m] = cls
    if crowd_px is not None:
        sem[crowd_px & (sem == 0)] = IGNORE
    return sem


def image_labels(annotations: Iterable[Mapping[str, Any]], cat_map: Mapping[int, int]) -> np.ndarray:
    """Multi-hot float32 vector (length 80, entry c = class c + 1) of the non-crowd annotations."""
    vec = np.zeros(len(COCO_CATEGORIES), dtype=np.float32)
    for ann in annotations:
        if not _is_crowd(ann):
            vec[_class_of(ann, cat_map) - 1] = 1.0
    return vec


def load_coco_annotations(path: str | Path) -> Dict[str, Any]:
    """Load an ``instances_*.json``; a missing, unreadable or incomplete file raises DataError naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"COCO annotation file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read COCO annotation file {path}: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"COCO annotation file {path} is not a json object")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DataError(f"COCO annotation file {path} lacks {missing}")
    return data


def _build_masks(
    data: Mapping[str, Any],
    source: Path,
    out_dir: Path,
    image_ids: Optional[Iterable[int | str]],
    crowd: str,
    list_path: Path,
    labels_path: Path,
    progress: bool,
) -> Dict[str, Any]:
    from tqdm import tqdm

    _check_crowd(crowd)
    cat_map = category_map(data["categories"], source)
    images = {int(im["id"]): im for im in data["images"]}
    by_image: Dict[int, List[Mapping[str, Any]]] = defaultdict(list)
    for ann in data["annotations"]:
        iid = int(ann["image_id"])
        if iid not in images:
            raise DataError(f"{source}: annotation {ann.get('id')} refers to image {iid}, which is not in 'images'")
        by_image[iid].append(ann)

    if image_ids is None:
        todo = sorted(images)
    else:
        todo = [int(i) for i in image_ids]
        unknown = [i for i in todo if i not in images]
        if unknown:
            raise DataError(f"{source}: image ids {unknown[:5]} are not in 'images'")

    palette = voc_palette()
    labels: Dict[str, np.ndarray] = {}
    n_ann = n_crowd = n_no_ann = n_no_label = 0
    for iid in tqdm(todo, desc=f"masks {source.name}", unit="img", disable=not progress, mininterval=5):
        anns = by_image.get(iid, [])
        try:
            sem = build_semantic_mask(images[iid], anns, cat_map, crowd=crowd)
            vec = image_labels(anns, cat_map)
        except DataError as e:
            raise DataError(f"{source}: {e}") from e
        write_label_png(out_dir / f"{iid}.png", sem, palette)
        labels[str(iid)] = vec
        n_crowd_here = sum(_is_crowd(a) for a in anns)
        n_crowd += n_crowd_here
        n_ann += len(anns) - n_crowd_here
        n_no_ann += not anns
        n_no_label += not vec.any()

    ids = [str(i) for i in todo]
    write_text_atomic(list_path, "".join(f"{i}\n" for i in ids))
    write_labels_csv(labels_path, ids, labels, COCO_CLASSES)
    return {
        "annotation_file": str(source),
        "mask_dir": str(out_dir),
        "list": str(list_path),
        "labels": str(labels_path),
        "crowd": crowd,
        "images": len(todo),
        "annotations": n_ann,
        "crowd_annotations": n_crowd,
        "images_without_annotations": n_no_ann,
        "images_without_labels": n_no_label,
    }


def build_coco_masks(
    annotation_json: str | Path,
    out_dir: str | Path,
    image_ids: Optional[Iterable[int | str]] = None,
    crowd: str = "background",
    list_path: str | Path | None = None,
    labels_path: str | Path | None = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Write ``<out_dir>/<int image id>.png`` for every image of ``annotation_json`` (or ``image_ids``).

    Also writes the image list (ascending ids unless ``image_ids`` gives an order; default
    ``<out_dir>/images.txt``) and the labels CSV (default ``<out_dir>/labels.csv``). Every file is
    written atomically. Returns stats: images, painted and crowd annotation counts, and how many
    images have no annotation at all / no image-level label (all-background masks; training skips
    them).
    """
    source = Path(annotation_json)
    out_dir = Path(out_dir)
    data = load_coco_annotations(source)
    return _build_masks(
        data,
        source,
        out_dir,
        image_ids,
        crowd,
        Path(list_path) if list_path is not None else out_dir / "images.txt",
        Path(labels_path) if labels_path is not None else out_dir / "labels.csv",
        progress,
    )


def prepare_coco_dataset(root: str | Path, crowd: str = "background", progress: bool = True) -> Dict[str, Any]:
    """Build masks, lists and label CSVs for train and val under ``root``; write the marker last.

    Reads ``<root>/annotations/instances_{train,val}2014.json``. The marker ``<root>/mask/.complete``
    (JSON: stats per split, crowd policy, wsss version) is removed first and written only after
    both splits succeeded, so an interrupted run never looks complete.
    """
    from .. import __version__

    _check_crowd(crowd)
    root = Path(root)
    ann_files = {s: root / "annotations" / f"instances_{s}2014.json" for s in SPLITS}
    for f in ann_files.values():
        if not f.exists():
            raise DataError(f"COCO annotation file not found: {f} (extract annotations_trainval2014.zip under {root})")
    marker = root / "mask" / MARKER_NAME
    marker.unlink(missing_ok=True)
    stats: Dict[str, Any] = {}
    for split in SPLITS:
        data = load_coco_annotations(ann_files[split])
        for im in data["images"]:
            expected = f"COCO_{split}2014_{int(im['id']):012d}.jpg"
            if im.get("file_name", expected) != expected:
                raise DataError(
                    f"{ann_files[split]}: image {im['id']} has file_name {im.get('file_name')!r}, "
                    f"expected {expected!r} (is this a COCO 2014 {split} annotation file?)"
                )
        stats[split] = _build_masks(
            data,
            ann_files[split],
            root / "mask" / f"{split}2014",
            None,
            crowd,
            root / "lists" / f"{split}.txt",
            root / "lists" / f"{split}_labels.csv",
            progress,
        )
        del data
    info = {
        "wsss_version": __version__,
        "dataset": "coco14",
        "crowd": crowd,
        "num_classes": len(COCO_CLASSES),
        "splits": stats,
    }
    write_json_atomic(marker, info)
    return info


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


class COCODataset(SegDataset):
    """COCO 2014 as prepared by :func:`prepare_coco_dataset` (layout in the module docstring).

    Image ids are the integer COCO image ids as strings (``"9"``, not ``"000000000009"``).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.class_names = list(COCO_CLASSES)
        self._ids: Dict[str, List[str]] = {}
        self._labels: Dict[str, Optional[Dict[str, np.ndarray]]] = {}  # None: no CSV
        self._split_of: Optional[Dict[str, str]] = None

    def splits(self) -> List[str]:
        return list(SPLITS)

    def list_path(self, split: str) -> Path:
        self._check_split(split)
        return self.root / "lists" / f"{split}.txt"

    def labels_path(self, split: str) -> Path:
        self._check_split(split)
        return self.root / "lists" / f"{split}_labels.csv"

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise KeyError(f"unknown COCO split {split!r}; valid splits: {', '.join(SPLITS)}")

    def ids(self, split: str) -> List[str]:
        if split not in self._ids:
            self._ids[split] = read_id_list(self.list_path(split))
        return list(self._ids[split])

    def split_of(self, image_id: str) -> str:
        """The split whose list holds ``image_id`` (lists that do not exist are skipped)."""
        if self._split_of is None:
            split_of: Dict[str, str] = {}
            for split in SPLITS:
                if not self.list_path(split).exists():
                    continue
                for i in self.ids(split):
                    if split_of.setdefault(i, split) != split:
                        raise DataError(
                            f"image id {i} is in both {self.list_path(split_of[i])} and {self.list_path(split)}"
                        )
            self._split_of = split_of
        try:
            return self._split_of[str(image_id)]
        except KeyError:
            lists = ", ".join(str(self.list_path(s)) for s in SPLITS)
            raise KeyError(f"image id {image_id!r} is in none of the COCO lists ({lists})") from None

    def image_path(self, image_id: str) -> Path:
        split = self.split_of(image_id)
        return self.root / f"{split}2014" / f"COCO_{split}2014_{int(image_id):012d}.jpg"

    def mask_path(self, image_id: str) -> Path:
        split = self.split_of(image_id)
        return self.root / "mask" / f"{split}2014" / f"{int(image_id)}.png"

    def labels(self, image_id: str) -> np.ndarray:
        """Labels from ``lists/<split>_labels.csv`` when it exists, else derived from the mask."""
        split = self.split_of(image_id)
        if split not in self._labels:
            path = self.labels_path(split)
            self._labels[split] = read_labels_csv(path, self.class_names) if path.exists() else None
        table = self._labels[split]
        if table is None:
            return labels_from_mask(self.load_mask(image_id), self.num_classes)
        try:
            return table[str(image_id)].copy()
        except KeyError:
            raise DataError(f"image {image_id} has no row in {self.labels_path(split)}") from None


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wsss.data.coco",
        description="Convert COCO 2014 instance annotations into WSSS label maps, lists and label CSVs.",
    )
    parser.add_argument("root", type=Path, help="COCO root holding annotations/instances_{train,val}2014.json")
    parser.add_argument("--crowd", choices=CROWD_POLICIES, default="background", help="crowd regions: 0 (BECO) or 255")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        info = prepare_coco_dataset(args.root, crowd=args.crowd, progress=not args.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
