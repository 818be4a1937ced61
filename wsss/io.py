"""File formats and atomic writes shared by every stage.

Every file a stage writes goes to a temporary name in the same folder and is renamed into place
only when complete, so an interrupted job never leaves a file that looks finished.

Temporary names are ``.tmp-<stem>-<host>-<pid>-<random><suffix>``: ``<host>`` and ``<pid>`` say
which process writes it. A job that is killed (SIGKILL, out of memory, a Slurm time limit) cannot
remove its temporary file, so :func:`atomic_path` removes the stale ones of the *same output* when
the next job starts writing it: siblings that match that output's name exactly (same stem, same
suffix) and were made on this host by a process that no longer exists. Temporary files of other
hosts (a shared file system) and of live processes are never touched, nor are names in another form
(such as the ``.tmp-<stem>-<random><suffix>`` names of older versions: remove those by hand). A
process lists a folder for stale temporary files once, the first time it writes there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Set, Tuple

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Raised for unreadable or inconsistent input data; the message names the file."""


def _host_tag() -> str:
    """This host's name as it appears in temporary names (characters other than ``[A-Za-z0-9._-]`` -> ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a real process id: never treat it as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # exists but belongs to someone else (or cannot be checked): keep its files
    return True


#: the random part ``tempfile.mkstemp`` adds: letters, digits and ``_`` (never ``-`` or ``.``)
_RANDOM_RE = re.compile(r"[a-z0-9_]+")


def _stale_temp_pid(name: str, prefix: str, suffix: str) -> int | None:
    """The process id in ``name`` if it is ``<prefix><pid>-<random><suffix>`` exactly, else None."""
    if not (name.startswith(prefix) and name.endswith(suffix)) or len(name) <= len(prefix) + len(suffix):
        return None
    rest = name[len(prefix) : len(name) - len(suffix)] if suffix else name[len(prefix) :]
    pid, sep, rand = rest.partition("-")
    if not sep or not pid.isdigit() or not _RANDOM_RE.fullmatch(rand):
        return None
    return int(pid)


def _remove_stale(folder: Path, names: Iterable[str], prefix: str, suffix: str) -> list[Path]:
    removed: list[Path] = []
    for name in names:
        pid = _stale_temp_pid(name, prefix, suffix)
        if pid is None or _pid_alive(pid):
            continue
        p = folder / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:
            pass  # another job removed it first
        except OSError as e:
            log.warning("could not remove stale temporary file %s: %s", p, e)
            continue
        else:
            log.info("removed stale temporary file %s (process %d on this host is gone)", p, pid)
        removed.append(p)
    return removed


def _temp_prefix(path: Path) -> str:
    return f".tmp-{path.stem}-{_host_tag()}-"


def remove_stale_temps(path: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Remove temporary files that killed jobs left for ``path`` (see the module docstring).

    Only names ``.tmp-<stem>-<host>-<pid>-<random><suffix>`` with exactly this ``path``'s stem
    and suffix, this host's name and the id of a process that no longer exists are removed (so
    ``shard-1-of-2``'s cleanup never touches ``shard-1-of-20``'s files). Returns the removed paths.
    """
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    try:
        with os.scandir(path.parent) as it:
            names = [e.name for e in it if e.name.startswith(".tmp-")]
    except OSError:
        return []
    return _remove_stale(path.parent, names, _temp_prefix(path), suffix)


#: per process: folder -> names of ``.tmp-*`` entries found when this process first wrote there.
#: :func:`atomic_path` lists a folder once per process, not once per file (a stage that writes
#: thousands of files into one folder would otherwise list it thousands of times); temporary files
#: of processes killed later are removed by the next process that writes the same output.
_TEMP_LISTINGS: Dict[Tuple[int, str], Set[str]] = {}
_TEMP_LISTINGS_LOCK = threading.Lock()


def _remove_stale_cached(path: Path, suffix: str) -> None:
    folder = path.parent
    key = (os.getpid(), os.path.abspath(folder))
    with _TEMP_LISTINGS_LOCK:
        names = _TEMP_LISTINGS.get(key)
        if names is None:
            try:
                with os.scandir(folder) as it:
                    names = {e.name for e in it if e.name.startswith(".tmp-")}
            except OSError:
                names = set()
            _TEMP_LISTINGS[key] = names
        prefix = _temp_prefix(path)
        mine = [n for n in names if n.startswith(prefix)]
    if mine:
        removed = _remove_stale(folder, mine, prefix, suffix)
        with _TEMP_LISTINGS_LOCK:
            names.difference_update(p.name for p in removed)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps the final suffix (so libraries that look at the extension work),
    starts with ``.tmp-`` so it is easy to spot, and holds this host's name and process id:
    ``.tmp-<stem>-<host>-<pid>-<random><suffix>``. On error the temporary file is removed; stale
    temporary files of the same output left by killed processes on this host are removed first
    (:func:`remove_stale_temps`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    _remove_stale_cached(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-{_host_tag()}-{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` through a temporary name (``dst`` appears only complete)."""
    import shutil

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label map (palette or grayscale PNG) as class indices (uint8, 255 = ignore).

    Palette PNGs are read through their indices, never converted through luminance.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"label map not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataError(f"label map {path} has mode {im.mode!r}; expected a palette or grayscale PNG")
            arr = np.asarray(im)
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"cannot read label map {path}: {e}") from e
    if arr.dtype != np.uint8:
        if arr.max(initial=0) > 255:
            raise DataError(f"label map {path} has values > 255")
        arr = arr.astype(np.uint8)
    return arr


def write_label_png(path: str | os.PathLike, labels: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write a uint8 label map as PNG (palette PNG if ``palette`` (256x3 uint8) is given), atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {labels.shape}")
    im = Image.fromarray(labels.astype(np.uint8), mode="P" if palette is not None else "L")
    if palette is not None:
        im.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def _image_bit_depth(im: Image.Image) -> int | None:
    """Bits per sample of a single-channel integer image (mode ``I`` / ``I;16*``), if known."""
    tags = getattr(im, "tag_v2", None)  # TIFF: BitsPerSample (12-bit data may sit in mode I;16)
    if tags is not None:
        bits = tags.get(258)
        if isinstance(bits, (tuple, list)):
            bits = bits[0] if len(set(bits)) == 1 else None
        if isinstance(bits, int):
            return bits
    if im.mode.startswith("I;16"):
        return 16
    if im.format == "PNG":
        return 16  # PIL opens only 16-bit grayscale PNGs as an integer mode
    return None


def _to_rgb8(im: Image.Image, path: Path) -> np.ndarray:
    """``im`` as HxWx3 uint8. High-bit-depth grayscale is scaled by its bit depth (16-bit: ``>> 8``).

    ``Image.convert("RGB")`` clips integer modes (``I``, ``I;16``) at 255, which turns a 16-bit
    image white; those are converted here instead. PIL itself already reduces 16-bit RGB(A) and
    grayscale+alpha PNGs to 8 bits per channel (the high byte), which matches ``>> 8``.
    """
    mode = im.mode
    if mode == "F":
        raise DataError(f"image {path} has floating-point pixels (mode 'F'); convert it to 8-bit RGB")
    if mode == "I" or mode.startswith("I;"):
        if mode.startswith("I;16S") or mode.startswith("I;32"):
            raise DataError(f"image {path} has signed or 32-bit pixels (mode {mode!r}); convert it to 8-bit RGB")
        bits = _image_bit_depth(im)
        if bits is None or not 1 <= bits <= 32:
            raise DataError(
                f"image {path} has integer pixels (mode {mode!r}) of unknown bit depth; convert it to 8-bit RGB"
            )
        arr = np.asarray(im).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= (1 << bits)):
            raise DataError(
                f"image {path} has pixel values in [{arr.min()}, {arr.max()}], outside its {bits}-bit range"
            )
        arr = (arr >> (bits - 8)) if bits > 8 else (arr << (8 - bits))
        gray = arr.astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an RGB image as HxWx3 uint8; a missing or corrupt file raises :class:`DataError`.

    16-bit images (grayscale or RGB/RGBA) are reduced to 8 bits by their bit depth (``>> 8``),
    not clipped; images whose bit depth cannot be told (float, signed or 32-bit integer
    pixels) raise :class:`DataError` rather than being guessed.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb8(im, path)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), as an ``n x 3`` uint8 array."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal
