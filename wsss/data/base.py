"""The reader interface every dataset (VOC 2012, COCO 2014, synthetic) implements.

A dataset is a folder of images and label maps plus split lists. Stages only use this interface, so
they treat every dataset alike:

* ``class_names``: list of class names, index 0 is ``background``; label maps use these indices and
  255 for "ignore".
* ``ids(split)``: the image ids of a split, in list order.
* ``image_path(id)`` / ``load_image(id)``: RGB uint8 HxWx3.
* ``mask_path(id)`` / ``load_mask(id)``: uint8 HxW class indices (255 = ignore).
* ``labels(id)``: image-level multi-hot vector over the foreground classes (length
  ``num_classes - 1``; entry ``c`` is class ``c + 1``), float32.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from ..io import DataError, read_image, read_label_png


class SegDataset(abc.ABC):
    """Abstract reader; subclasses set ``root``, ``class_names`` and implement the path methods."""

    root: Path
    class_names: List[str]

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.class_names)

    @property
    def num_fg_classes(self) -> int:
        return len(self.class_names) - 1

    @abc.abstractmethod
    def splits(self) -> List[str]:
        """Names of the available splits."""

    @abc.abstractmethod
    def ids(self, split: str) -> List[str]:
        """Image ids of ``split`` in list order; unknown split raises KeyError naming valid ones."""

    @abc.abstractmethod
    def image_path(self, image_id: str) -> Path:
        ...

    @abc.abstractmethod
    def mask_path(self, image_id: str) -> Path:
        ...

    def load_image(self, image_id: str) -> np.ndarray:
        return read_image(self.image_path(image_id))

    def load_mask(self, image_id: str) -> np.ndarray:
        mask = read_label_png(self.mask_path(image_id))
        bad = (mask >= self.num_classes) & (mask != 255)
        if bad.any():
            raise DataError(
                f"label map {self.mask_path(image_id)} has class index {int(mask[bad].max())} "
                f">= {self.num_classes} classes"
            )
        return mask

    def labels_from_mask(self, image_id: str) -> np.ndarray:
        """Image-level multi-hot labels derived from the label map (background and 255 dropped)."""
        mask = self.load_mask(image_id)
        return labels_from_mask(mask, self.num_classes)

    def labels(self, image_id: str) -> np.ndarray:
        """Image-level labels; default: derived from the mask. Subclasses may read a label file."""
        return self.labels_from_mask(image_id)


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    present = np.unique(mask)
    present = present[(present > 0) & (present < num_classes)]
    vec = np.zeros(num_classes - 1, dtype=np.float32)
    vec[present.astype(np.int64) - 1] = 1.0
    return vec


def read_id_list(path: Path) -> List[str]:
    """Read an image-id list (one id per line, as strings; never parsed as integers)."""
    if not Path(path).exists():
        raise DataError(f"image list not found: {path}")
    ids = [line.strip() for line in Path(path).read_text().splitlines()]
    ids = [i.split()[0] for i in ids if i]
    if not ids:
        raise DataError(f"image list {path} is empty")
    return ids


def write_labels_csv(path: Path, ids: Sequence[str], labels: Dict[str, np.ndarray], class_names: Sequence[str]) -> None:
    """Write image-level labels as CSV: ``image_id`` then one 0/1 column per foreground class."""
    import pandas as pd

    from ..io import atomic_path

    fg = list(class_names[1:])
    rows = [[i] + [int(v) for v in labels[i]] for i in ids]
    df = pd.DataFrame(rows, columns=["image_id"] + fg)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_labels_csv(path: Path, class_names: Sequence[str]) -> Dict[str, np.ndarray]:
    """Read a labels CSV written by :func:`write_labels_csv`: image id -> float32 0/1 vector.

    The header must be ``image_id`` then the foreground classes of ``class_names`` in order. Every
    value must be 0 or 1 (``0.0`` / ``1.0`` are accepted too). An empty or header-only file, a row
    with more or fewer fields than the header (a file cut mid-row), an empty image id or cell, NaN,
    any other number (2, -1, 0.5) or text, and an image id on two rows raise :class:`DataError`
    naming the file, the line (1-based, as in an editor), the image and the class column.
    """
    from ..csvio import csv_records

    path = Path(path)
    if not path.exists():
        raise DataError(f"labels file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read labels file {path}: {e}") from e
    fg = list(class_names[1:])
    records = csv_records(text, path)
    first = next(records, None)
    if first is None:
        raise DataError(f"labels file {path} is empty; expected a header image_id + {fg}")
    if first[1] != ["image_id"] + fg:
        raise DataError(f"labels file {path} has columns {first[1]}; expected image_id + {fg}")
    ncol = 1 + len(fg)
    values = {"0": 0.0, "1": 1.0}  # parsed cell text -> value (each distinct text parsed once)
    out: Dict[str, np.ndarray] = {}
    lines: Dict[str, int] = {}
    for line, fields in records:
        where = f"labels file {path}, line {line}"
        image_id = fields[0]
        if image_id.strip() == "":
            raise DataError(f"{where}: empty image_id")
        where += f" (image {image_id})"
        if len(fields) != ncol:
            if len(fields) < ncol:
                raise DataError(f"{where} has {len(fields)} field(s) but the header has {ncol}: no value for "
                                f"column(s) {fg[len(fields) - 1:]} (file cut mid-row?)")
            raise DataError(f"{where} has {len(fields)} fields but the header has {ncol} (image_id + {len(fg)} classes)")
        if image_id in lines:
            raise DataError(f"{where}: image id {image_id!r} is also on line {lines[image_id]}; each image may have one row")
        row = []
        for name, cell in zip(fg, fields[1:]):
            v = values.get(cell)
            if v is None:
                try:
                    v = float(cell)
                except ValueError:
                    v = None
                if v not in (0.0, 1.0):
                    shown = "an empty cell" if cell.strip() == "" else f"{cell!r}"
                    raise DataError(f"{where}, column {name!r}: {shown}; image-level labels must be 0 or 1")
                v = values[cell] = 1.0 if v == 1.0 else 0.0  # "-0" and "-0.0" read as 0.0
            row.append(v)
        lines[image_id] = line
        out[image_id] = np.asarray(row, dtype=np.float32)
    if not out:
        raise DataError(f"labels file {path} has a header but no rows")
    return out
