"""HDF5 store for class activation maps (CAMs), one file per shard.

Layout (format version 2; the full description is ``docs/cam_hdf5_format.md``)::

    /                       file attrs: format_version, package_version, config_hash, config_json,
                            scales, normalisation, shard_index, num_shards, num_images, complete,
                            num_classes (number of foreground classes; when the writer was told it)
    /<image id>/            group attrs: height, width
        keys      int16   (K,)                 present foreground classes, 0-based (label id - 1)
        cam       float16 (K, ceil(H/4), ceil(W/4))   strided CAM in [0, 1]
        high_res  float16 (K, H, W)                   full-resolution CAM in [0, 1]

Every non-empty dataset carries HDF5's Fletcher-32 checksum filter (version 2), so a damaged chunk
is detected on read; readers also check ``keys`` (1-D integer, unique, ``0 <= k < num_classes``)
and the map shapes against ``keys`` and the image size. Damage raises :class:`wsss.io.DataError`
naming the shard file and the image id. Version 1 files (no checksums, no ``num_classes``) are
still read, with the same checks except the checksums and the class range.

Writers (:class:`CamShardWriter`) write to a temporary file next to the target and rename it into
place only after setting ``complete = True``; readers (:class:`CamStore`) refuse anything else, so an
interrupted job never leaves a shard that looks finished. One writer per file: parallel jobs write
separate shards and :class:`CamStore` reads them together (or :func:`merge_shards` joins them).
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np

from . import __version__
from .config import config_hash  # the one project-wide hash of a resolved config
from .io import DataError, atomic_path

FORMAT_VERSION = 2
#: Versions this code reads: 1 lacks the Fletcher-32 checksums and the ``num_classes`` attr.
READABLE_FORMAT_VERSIONS = (1, 2)
FIELDS = ("keys", "cam", "high_res")
#: File attrs that describe how the maps were made; they are the same in every shard of one run.
SHARED_ATTRS = ("format_version", "package_version", "config_hash", "config_json", "scales", "normalisation")
#: Values may leave [0, 1] by this much (rounding in the producer); they are clipped, larger excursions raise.
RANGE_TOLERANCE = 1e-3
#: gzip level for the maps; chosen with ``bench/cam_store_size.py`` (see docs/cam_hdf5_format.md).
DEFAULT_GZIP_LEVEL = 4
#: Largest chunk in bytes: a map up to this size is one chunk, bigger maps are chunked per class plane
#: (and per row block if one plane is bigger still). 1 MiB also fits HDF5's default chunk cache.
CHUNK_BYTES = 1 << 20


def _chunk_shape(shape: Tuple[int, int, int], itemsize: int) -> Tuple[int, int, int]:
    k, h, w = shape
    if k * h * w * itemsize <= CHUNK_BYTES:
        return (k, h, w)
    rows = max(1, min(h, CHUNK_BYTES // (w * itemsize)))
    return (1, rows, w)


def _check_image_id(image_id: Any) -> str:
    if not isinstance(image_id, str) or not image_id or "/" in image_id or image_id in (".", ".."):
        raise ValueError(f"image id must be a non-empty string without '/', got {image_id!r}")
    return image_id


def _as_map(image_id: str, name: str, arr: Any, k: int) -> np.ndarray:
    """Validate one CAM array (K x h x w, values in [0, 1] within tolerance) and return it as float16."""
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[0] != k:
        raise ValueError(f"image {image_id!r}: {name} must have shape (K={k}, h, w), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"image {image_id!r}: {name} must be a float array, got dtype {arr.dtype}")
    if arr.size:
        if not np.isfinite(arr).all():
            raise ValueError(f"image {image_id!r}: {name} contains NaN or inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(
                f"image {image_id!r}: {name} values span [{lo:.6g}, {hi:.6g}], outside [0, 1] "
                f"(tolerance {RANGE_TOLERANCE}); CAMs must be max-normalised per class"
            )
    return np.clip(arr, 0.0, 1.0).astype(np.float16)


def _read_shared_attrs(f: h5py.File) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in SHARED_ATTRS:
        value = f.attrs[name]
        out[name] = value.item() if isinstance(value, np.generic) else value
    return out


def _check_version(path: Path, attrs: h5py.AttributeManager) -> int:
    if "format_version" not in attrs:
        raise ValueError(f"{path} is not a wsss CAM shard (no format_version attribute)")
    version = int(attrs["format_version"])
    if version not in READABLE_FORMAT_VERSIONS:
        raise ValueError(
            f"CAM shard {path} has format_version {version}; this wsss ({__version__}) reads only "
            f"format_version {', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Regenerate the CAMs or use "
            f"a matching wsss version"
        )
    return version


def _read_num_classes(path: Path, attrs: h5py.AttributeManager) -> Optional[int]:
    """The ``num_classes`` attr (foreground classes), or None if the file does not record it."""
    if "num_classes" not in attrs:
        return None
    value = attrs["num_classes"]
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and int(value) > 0):
        raise DataError(f"CAM shard {path} has an invalid num_classes attribute {value!r}")
    return int(value)


def _check_keys(keys: np.ndarray, num_classes: Optional[int]) -> Optional[str]:
    """Why ``keys`` (as stored) is invalid, or None: 1-D integer, unique, ``0 <= k < num_classes``."""
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        return f"keys must be a 1-D integer array, got {keys.dtype} {keys.shape}"
    if keys.size and keys.min() < 0:
        return f"keys {keys.tolist()} contain a negative class index"
    if keys.size and num_classes is not None and keys.max() >= num_classes:
        return f"keys {keys.tolist()} contain a class index >= num_classes ({num_classes})"
    if len(np.unique(keys)) != keys.size:
        return f"keys {keys.tolist()} contain duplicates"
    return None


def _check_group(
    path: Path, image_id: str, g: h5py.Group, num_classes: Optional[int]
) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Read and check one image group's ``keys`` and the map shapes; returns (keys, (H, W)).

    Damage (a failed checksum, bad keys, shapes that disagree) raises :class:`DataError` naming
    the file and the image.
    """
    where = f"CAM shard {path}, image {image_id!r}"
    try:
        missing = [name for name in FIELDS if name not in g]
        if missing:
            raise DataError(f"{where}: missing dataset(s) {', '.join(missing)}; the file is damaged")
        if "height" not in g.attrs or "width" not in g.attrs:
            raise DataError(f"{where}: missing height/width attributes; the file is damaged")
        size = (int(g.attrs["height"]), int(g.attrs["width"]))
        keys = g["keys"][()]
        shapes = {name: g[name].shape for name in ("cam", "high_res")}
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{where}: cannot read keys or attributes ({e}); the file is damaged, regenerate it") from e
    problem = _check_keys(np.asarray(keys), num_classes)
    if problem is not None:
        raise DataError(f"{where}: {problem}; the file is damaged, regenerate it")
    k = int(keys.size)
    height, width = size
    expected = {"cam": (k, math.ceil(height / 4), math.ceil(width / 4)), "high_res": (k, height, width)}
    for name, shape in shapes.items():
        if tuple(shape) != expected[name]:
            raise DataError(
                f"{where}: {name} has shape {tuple(shape)}, expected {expected[name]} for {k} keys and "
                f"size {height}x{width}; the file is damaged, regenerate it"
            )
    return keys, size


def _check_complete(path: Path, attrs: h5py.AttributeManager) -> None:
    complete = attrs.get("complete", None)
    if not (isinstance(complete, (bool, np.bool_)) and bool(complete)):
        raise ValueError(f"incomplete or interrupted CAM shard {path} (its 'complete' attribute is not True)")


class CamShardWriter:
    """Write one CAM shard; use as a context manager.

    The file is written under a temporary name next to ``path`` and renamed onto ``path`` only when
    the ``with`` block ends without an exception (after ``num_images`` and ``complete = True`` are
    set). On an exception the temporary file is removed; an existing ``path`` is left untouched.

    ``config`` is the resolved config that produced the maps (stored as JSON and as
    :func:`config_hash`); ``scales`` and ``normalisation`` describe the inference.
    ``num_classes`` (the number of foreground classes), when given, is stored as a file attr;
    ``add`` then refuses keys ``>= num_classes`` and readers check every image's keys against it.
    ``skipped``: ids of this shard left out on purpose (no image-level label and
    ``classifier.on_unlabelled: skip``), stored as the JSON attr ``skipped_ids`` so later stages
    skip the same images (:attr:`CamStore.skipped`) instead of reporting them missing.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        config: Mapping[str, Any],
        scales: Sequence[float],
        normalisation: str,
        shard_index: int = 0,
        num_shards: int = 1,
        gzip_level: int = DEFAULT_GZIP_LEVEL,
        num_classes: Optional[int] = None,
        skipped: Sequence[str] = (),
    ):
        shard_index, num_shards = operator.index(shard_index), operator.index(num_shards)
        if num_classes is not None:
            num_classes = operator.index(num_classes)
            if num_classes <= 0:
                raise ValueError(f"num_classes (foreground classes) must be positive, got {num_classes}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} out of range for num_shards {num_shards}")
        scales_arr = np.asarray(scales, dtype=np.float64).reshape(-1)
        if scales_arr.size == 0 or not np.all(np.isfinite(scales_arr) & (scales_arr > 0)):
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales!r}")
        if not 0 <= gzip_level <= 9:
            raise ValueError(f"gzip_level must be in 0..9, got {gzip_level}")
        self.path = Path(path)
        self.gzip_level = int(gzip_level)
        self._attrs: Dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "config_hash": config_hash(config),
            "config_json": json.dumps(config, sort_keys=True, default=str),
            "scales": scales_arr,
            "normalisation": str(normalisation),
            "shard_index": shard_index,
            "num_shards": num_shards,
        }
        if num_classes is not None:
            self._attrs["num_classes"] = num_classes
        if skipped:
            self._attrs["skipped_ids"] = json.dumps([_check_image_id(i) for i in skipped])
        self.num_classes = num_classes
        self._ids: set[str] = set()
        self._file: Optional[h5py.File] = None
        self._stack: Optional[contextlib.ExitStack] = None

    def __enter__(self) -> "CamShardWriter":
        if self._stack is not None:
            raise RuntimeError(f"CamShardWriter for {self.path} is already open")
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            f = stack.enter_context(h5py.File(tmp, "w"))
            for name, value in {**self._attrs, "num_images": 0, "complete": False}.items():
                f.attrs[name] = value
            self._stack, self._file = stack.pop_all(), f
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        f, self._file = self._file, None
        assert stack is not None and f is not None
        if exc_type is not None:
            # closes the file, removes the temporary file; the exception propagates
            return bool(stack.__exit__(exc_type, exc, tb))
        with stack:  # on success: close the file, then rename it onto self.path
            f.attrs["num_images"] = len(self._ids)
            f.attrs["complete"] = True
        return False

    def __len__(self) -> int:
        return len(self._ids)

    def _open_file(self) -> h5py.File:
        if self._file is None:
            raise RuntimeError("CamShardWriter must be used as a context manager ('with CamShardWriter(...) as w:')")
        return self._file

    def _claim_id(self, image_id: Any) -> str:
        image_id = _check_image_id(image_id)
        if image_id in self._ids:
            raise ValueError(f"image {image_id!r} was already added to CAM shard {self.path}")
        self._ids.add(image_id)
        return image_id

    def add(self, image_id: str, keys: Any, cam: Any, high_res: Any) -> None:
        """Add one image's maps; everything is validated before anything is written.

        ``keys``: integer (K,) foreground class indices (0-based, unique); ``cam``: float
        K x ceil(H/4) x ceil(W/4); ``high_res``: float K x H x W; both with values in [0, 1].
        """
        f = self._open_file()
        image_id = _check_image_id(image_id)
        keys_arr = np.asarray(keys)
        if keys_arr.ndim != 1 or not (np.issubdtype(keys_arr.dtype, np.integer) or keys_arr.size == 0):
            raise ValueError(
                f"image {image_id!r}: keys must be a 1-D integer array, got {keys_arr.dtype} {keys_arr.shape}"
            )
        if keys_arr.size and (keys_arr.min() < 0 or keys_arr.max() > np.iinfo(np.int16).max):
            raise ValueError(
                f"image {image_id!r}: keys must be 0-based foreground class indices, got {keys_arr.tolist()}"
            )
        if keys_arr.size and self.num_classes is not None and keys_arr.max() >= self.num_classes:
            raise ValueError(
                f"image {image_id!r}: keys {keys_arr.tolist()} must be < num_classes ({self.num_classes} foreground classes)"
            )
        if len(np.unique(keys_arr)) != keys_arr.size:
            raise ValueError(f"image {image_id!r}: keys contain duplicates: {keys_arr.tolist()}")
        k = int(keys_arr.size)
        high = _as_map(image_id, "high_res", high_res, k)
        low = _as_map(image_id, "cam", cam, k)
        height, width = high.shape[1:]
        strided = (math.ceil(height / 4), math.ceil(width / 4))
        if low.shape[1:] != strided:
            raise ValueError(
                f"image {image_id!r}: cam must be (K, ceil(H/4), ceil(W/4)) = (K, {strided[0]}, {strided[1]}) "
                f"for high_res of size {height}x{width}, got {low.shape}"
            )
        g = f.create_group(self._claim_id(image_id))
        g.attrs["height"] = int(height)
        g.attrs["width"] = int(width)
        if k == 0:  # K = 0: empty datasets (chunking, so the checksum filter, needs non-zero dimensions)
            g.create_dataset("keys", shape=(0,), dtype=np.int16)
        else:  # one chunk with a Fletcher-32 checksum, so a damaged class index is detected
            g.create_dataset("keys", data=keys_arr.astype(np.int16), chunks=(k,), fletcher32=True)
        for name, arr in (("cam", low), ("high_res", high)):
            if arr.size == 0:
                g.create_dataset(name, shape=arr.shape, dtype=np.float16)
            else:
                g.create_dataset(
                    name,
                    data=arr,
                    chunks=_chunk_shape(arr.shape, arr.itemsize),
                    compression="gzip",
                    compression_opts=self.gzip_level,
                    shuffle=True,
                    fletcher32=True,  # applied after gzip: each stored chunk carries its checksum
                )

    def _copy_group(self, src: h5py.Group, image_id: str) -> None:
        """Copy a group read from a checked shard, keeping its stored (compressed) chunks."""
        f = self._open_file()
        src.file.copy(src, f, name=self._claim_id(image_id))


@dataclass
class CamRecord:
    """One image's CAMs as read from a store (fields not requested by :meth:`CamStore.get` are None)."""

    keys: Optional[np.ndarray]  # int64 (K,)
    cam: Optional[np.ndarray]  # float32 K x ceil(H/4) x ceil(W/4)
    high_res: Optional[np.ndarray]  # float32 K x H x W
    size: Tuple[int, int]  # (H, W)


class CamStore:
    """Read-only random access by image id over one or more CAM shard files.

    Opening checks every shard (complete, format version, same ``config_hash``, no id in two shards)
    and builds an id -> shard index from the group names; the files are then closed again and
    reopened lazily in whichever process reads, so a store can be handed to DataLoader workers
    (forked or spawned) safely.
    """

    def __init__(self, paths: str | os.PathLike | Iterable[str | os.PathLike]):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths: List[Path] = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("CamStore needs at least one shard file")
        self._index: Dict[str, int] = {}
        #: (shard_index, num_shards) of each file, in ``paths`` order
        self.shard_info: List[Tuple[int, int]] = []
        #: format_version of each file, in ``paths`` order
        self.format_versions: List[int] = []
        #: num_classes attr of each file (None where a file does not record it), in ``paths`` order
        self.shard_num_classes: List[Optional[int]] = []
        #: ids the CAM stage left out on purpose (unlabelled images, ``classifier.on_unlabelled: skip``)
        self.skipped: set[str] = set()
        shared: Optional[Dict[str, Any]] = None
        for i, path in enumerate(self.paths):
            if not path.exists():
                raise FileNotFoundError(f"CAM shard not found: {path}")
            try:
                f = h5py.File(path, "r")
            except OSError as e:
                raise ValueError(f"cannot open CAM shard {path}: {e}") from e
            with f:
                self.format_versions.append(_check_version(path, f.attrs))
                _check_complete(path, f.attrs)
                self.shard_num_classes.append(_read_num_classes(path, f.attrs))
                attrs = _read_shared_attrs(f)
                if shared is None:
                    shared = attrs
                elif attrs["config_hash"] != shared["config_hash"]:
                    raise ValueError(
                        f"CAM shards were made with different configs: {self.paths[0]} has config_hash "
                        f"{shared['config_hash']}, {path} has {attrs['config_hash']}"
                    )
                self.shard_info.append((int(f.attrs["shard_index"]), int(f.attrs["num_shards"])))
                names = list(f.keys())
                if len(names) != int(f.attrs["num_images"]):
                    raise ValueError(
                        f"CAM shard {path} holds {len(names)} images but its num_images attribute says "
                        f"{int(f.attrs['num_images'])}"
                    )
                skipped = json.loads(f.attrs["skipped_ids"]) if "skipped_ids" in f.attrs else []
            overlap = set(skipped) & set(names)
            if overlap:
                raise DataError(f"CAM shard {path} lists images as both stored and skipped: {sorted(overlap)[:5]}")
            self.skipped.update(skipped)
            for name in names:
                j = self._index.setdefault(name, i)
                if j != i:
                    raise ValueError(f"image {name!r} is in two CAM shards: {self.paths[j]} and {path}")
        assert shared is not None
        self.attrs: Dict[str, Any] = shared
        known = {(n, str(p)) for n, p in zip(self.shard_num_classes, self.paths) if n is not None}
        if len({n for n, _ in known}) > 1:
            raise DataError(
                "CAM shards record different num_classes: " + ", ".join(f"{p}: {n}" for n, p in sorted(known))
            )
        #: number of foreground classes recorded by the shards (None if none records it)
        self.num_classes: Optional[int] = next(iter(known))[0] if known else None
        self._files: List[Optional[h5py.File]] = [None] * len(self.paths)
        self._pid = os.getpid()

    @property
    def config(self) -> Dict[str, Any]:
        """The resolved config that produced the maps (parsed ``config_json``)."""
        return json.loads(self.attrs["config_json"])

    def ids(self) -> List[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def _group(self, image_id: str) -> h5py.Group:
        try:
            i = self._index[image_id]
        except (KeyError, TypeError):
            raise KeyError(f"image {image_id!r} is not in the CAM store ({', '.join(map(str, self.paths))})") from None
        if self._pid != os.getpid():
            # inherited from the parent process: never touch its HDF5 handles, open our own
            self._files = [None] * len(self.paths)
            self._pid = os.getpid()
        path = self.paths[i]
        try:
            f = self._files[i]
            if f is None:
                f = self._files[i] = h5py.File(path, "r")
            return f[image_id]
        except (OSError, KeyError) as e:
            raise DataError(
                f"CAM shard {path}, image {image_id!r}: cannot open the image group ({e}); the file is damaged"
            ) from e

    def get(self, image_id: str, fields: Sequence[str] = ("keys", "high_res")) -> CamRecord:
        """Read only ``fields`` (a subset of ``keys``, ``cam``, ``high_res``); the others are None.

        ``keys`` and the map shapes are always checked; a failed checksum or other damage raises
        :class:`wsss.io.DataError` naming the shard file and the image id.
        """
        if isinstance(fields, str):
            fields = (fields,)
        unknown = [f for f in fields if f not in FIELDS]
        if unknown:
            raise ValueError(f"unknown CAM fields {unknown}; valid fields: {', '.join(FIELDS)}")
        g = self._group(image_id)
        i = self._index[image_id]
        path = self.paths[i]
        keys, size = _check_group(path, image_id, g, self.shard_num_classes[i])
        out: Dict[str, Optional[np.ndarray]] = {name: None for name in FIELDS}
        for name in fields:
            if name == "keys":
                out[name] = keys.astype(np.int64)
                continue
            try:
                data = g[name][()]
            except OSError as e:  # h5py: a failed Fletcher-32 checksum or an undecodable chunk
                raise DataError(
                    f"CAM shard {path}, image {image_id!r}: cannot read {name} ({e}); the file is damaged "
                    f"(checksum or decompression failure), regenerate it"
                ) from e
            out[name] = data.astype(np.float32)
        return CamRecord(size=size, **out)

    def __getitem__(self, image_id: str) -> CamRecord:
        return self.get(image_id, FIELDS)

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files:
                if f is not None:
                    f.close()
        self._files = [None] * len(self.paths)
        self._pid = os.getpid()

    def __enter__(self) -> "CamStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = [None] * len(self.paths)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


def merge_shards(paths: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> Path:
    """Join shards into one file (``num_shards = 1``), written atomically; returns ``out_path``.

    The shards must pass :class:`CamStore`'s checks and form a full set (shard indices
    ``0..num_shards-1`` once each), so a merged file never silently lacks a shard. Image groups are
    copied as stored (no re-compression, checksums kept) after their ``keys`` and shapes are
    checked; file attrs other than the shard counters are kept. The merged file gets the oldest
    ``format_version`` of its shards (a version-1 shard's groups have no checksums), and
    ``num_classes`` when a shard records it.
    """
    with CamStore(paths) as store:
        expected = store.shard_info[0][1]
        if sorted(i for i, _ in store.shard_info) != list(range(expected)) or any(
            n != expected for _, n in store.shard_info
        ):
            raise ValueError(
                "merge_shards needs every shard of one run exactly once; got (shard_index, num_shards) "
                f"{store.shard_info} from {', '.join(map(str, store.paths))}"
            )
        writer = CamShardWriter(
            out_path,
            config=store.config,
            scales=store.attrs["scales"],
            normalisation=store.attrs["normalisation"],
            num_classes=store.num_classes,
            skipped=sorted(store.skipped),
        )
        writer._attrs["package_version"] = store.attrs["package_version"]  # keep the producing version
        writer._attrs["format_version"] = min(store.format_versions)
        with writer:
            for image_id in store.ids():
                g = store._group(image_id)
                i = store._index[image_id]
                _check_group(store.paths[i], image_id, g, store.num_classes)
                writer._copy_group(g, image_id)
    return Path(out_path)
