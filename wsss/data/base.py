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
    """Read a labels CSV written by :func:`write_labels_csv`; checks the class columns."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise DataError(f"labels file not found: {path}")
    df = pd.read_csv(path, dtype={"image_id": str})
    fg = list(class_names[1:])
    if list(df.columns) != ["image_id"] + fg:
        raise DataError(f"labels file {path} has columns {list(df.columns)}; expected image_id + {fg}")
    return {r[0]: np.asarray(r[1:], dtype=np.float32) for r in df.itertuples(index=False, name=None)}
