"""PASCAL VOC 2012 (+ SBD ``SegmentationClassAug``) reader, also used for the synthetic dataset.

Layout (``root`` is ``.../VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png        palette PNGs (VOC train/val), 255 = boundary/void
    SegmentationClassAug/<id>.png     index PNGs for train_aug + val (SBD-derived)
    Annotations/<id>.xml              object names (optional, for image-level labels)
    ImageSets/Segmentation/{train,val,trainval,train_aug}.txt

Label maps are read through their palette indices (never converted through luminance).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..io import DataError
from .base import SegDataset, read_id_list, read_labels_csv

VOC_CLASSES: List[str] = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]

#: Number of ids in the standard lists (checked by ``VOCDataset.check_standard_lists``).
VOC_LIST_SIZES = {"train_aug": 10582, "train": 1464, "val": 1449}


class VOCDataset(SegDataset):
    """Reader for the VOC layout.

    ``mask_dir`` picks the ground truth: ``"SegmentationClassAug"`` (default when present; covers
    train_aug and val, the KTSE/BECO evaluation convention) or ``"SegmentationClass"`` (original VOC
    masks for train/val; the IRN evaluation convention). ``lists_dir`` may point elsewhere (e.g. the
    ``train_aug.txt`` shipped by IRN); it defaults to ``ImageSets/Segmentation``.
    ``labels_csv`` (written by the ``image_labels`` rule) is used for image-level labels when given.
    """

    def __init__(
        self,
        root: str | Path,
        class_names: Optional[Sequence[str]] = None,
        mask_dir: Optional[str] = None,
        lists_dir: Optional[str | Path] = None,
        labels_csv: Optional[str | Path] = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset root not found: {self.root}")
        if class_names is None:
            meta = self.root / "classes.json"
            class_names = json.loads(meta.read_text())["class_names"] if meta.exists() else VOC_CLASSES
        self.class_names = list(class_names)
        if self.class_names[0] != "background":
            raise DataError(f"class list of {self.root} must start with 'background'")
        if mask_dir is None:
            mask_dir = "SegmentationClassAug" if (self.root / "SegmentationClassAug").is_dir() else "SegmentationClass"
        self.mask_dir = self.root / mask_dir
        self.lists_dir = Path(lists_dir) if lists_dir is not None else self.root / "ImageSets" / "Segmentation"
        self._lists: Dict[str, List[str]] = {}
        self._labels = read_labels_csv(Path(labels_csv), self.class_names) if labels_csv else None

    def splits(self) -> List[str]:
        if not self.lists_dir.is_dir():
            raise DataError(f"image-list folder not found: {self.lists_dir}")
        return sorted(p.stem for p in self.lists_dir.glob("*.txt"))

    def ids(self, split: str) -> List[str]:
        if split not in self._lists:
            path = self.lists_dir / f"{split}.txt"
            if not path.exists():
                raise KeyError(f"split {split!r} not found in {self.lists_dir}; available: {self.splits()}")
            self._lists[split] = read_id_list(path)
        return self._lists[split]

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.mask_dir / f"{image_id}.png"

    def annotation_path(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    def labels_from_xml(self, image_id: str) -> np.ndarray:
        """Image-level labels from ``Annotations/<id>.xml`` (every ``object/name`` that is a class,
        ``difficult`` objects included, as IRN's ``make_cls_labels.py``)."""
        path = self.annotation_path(image_id)
        if not path.exists():
            raise DataError(f"annotation not found: {path}")
        try:
            tree = ET.parse(path)
        except ET.ParseError as e:
            raise DataError(f"cannot parse annotation {path}: {e}") from e
        vec = np.zeros(self.num_fg_classes, dtype=np.float32)
        index = {n: i for i, n in enumerate(self.class_names)}
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name in index and index[name] > 0:
                vec[index[name] - 1] = 1.0
        return vec

    def labels(self, image_id: str) -> np.ndarray:
        if self._labels is not None:
            try:
                return self._labels[image_id]
            except KeyError:
                raise DataError(f"image {image_id!r} has no entry in the labels file") from None
        if self.mask_path(image_id).exists():
            return self.labels_from_mask(image_id)
        return self.labels_from_xml(image_id)

    def check_standard_lists(self) -> Dict[str, int]:
        """Compare list sizes with the standard VOC numbers; returns {split: count} of mismatches."""
        bad = {}
        for split, n in VOC_LIST_SIZES.items():
            if (self.lists_dir / f"{split}.txt").exists() and len(self.ids(split)) != n:
                bad[split] = len(self.ids(split))
        return bad


def make_train_aug_list(root: str | Path, out_path: str | Path, given_list: Optional[str | Path] = None) -> int:
    """Write the ``train_aug`` list: the ids of ``SegmentationClassAug`` minus VOC ``val``.

    SegmentationClassAug holds 12,031 label maps (train_aug ∪ val); removing the 1,449 val ids gives
    the standard 10,582-id list that IRN ships as ``voc12/train_aug.txt``. With ``given_list`` the
    ids are read from that file instead (and checked to have a label map each). Returns the count.
    """
    from ..io import write_text_atomic

    root = Path(root)
    aug = root / "SegmentationClassAug"
    if given_list is not None:
        ids = read_id_list(Path(given_list))
        missing = [i for i in ids if not (aug / f"{i}.png").exists()]
        if missing:
            raise DataError(f"{len(missing)} id(s) of {given_list} have no label map in {aug}, e.g. {missing[:5]}")
    else:
        if not aug.is_dir():
            raise DataError(f"label folder not found: {aug} (extract SegmentationClassAug.zip there)")
        val = set(read_id_list(root / "ImageSets" / "Segmentation" / "val.txt"))
        ids = sorted(p.stem for p in aug.glob("*.png") if p.stem not in val)
        if not ids:
            raise DataError(f"no train_aug ids found in {aug}")
    write_text_atomic(out_path, "".join(f"{i}\n" for i in ids))
    return len(ids)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m wsss.data.voc", description="Write the VOC train_aug list.")
    p.add_argument("root", help="VOCdevkit/VOC2012 folder")
    p.add_argument("--given-list", default=None, help="use this id list instead of deriving it")
    args = p.parse_args(argv)
    try:
        n = make_train_aug_list(args.root, Path(args.root) / "ImageSets" / "Segmentation" / "train_aug.txt", args.given_list)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"train_aug: {n} ids")
    if n != VOC_LIST_SIZES["train_aug"]:
        print(f"warning: the standard train_aug list has {VOC_LIST_SIZES['train_aug']} ids", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
