"""Download, verify and safely extract the dataset archives (VOC 2012, SBD labels, COCO 2014).

Three layers, each usable on its own:

* :func:`download` fetches one URL (``http(s)://`` or ``file://``, standard library only) to a
  file. It streams into ``<file>.part`` and resumes an interrupted download with an HTTP
  ``Range`` request (a server that ignores ``Range`` and answers ``200`` makes it start over
  cleanly). The finished file is checked — size first, then md5 and/or sha256 in one streaming
  pass — and only then renamed to its final name. A file that fails the check is kept as
  ``<file>.corrupt`` for inspection and :class:`ChecksumError` is raised; a transfer that stops
  early keeps ``<file>.part`` so the next run resumes. A final file that is already present and
  passes the check is not downloaded again. No network (DNS failure, connection refused,
  timeout) raises :class:`DownloadError` with the URL and the path where a file fetched by hand
  must be placed.
* :func:`safe_extract` unpacks a tar (any compression) or zip archive. Absolute paths, ``..``
  components, symlinks, hardlinks and device/fifo members are refused with
  :class:`UnsafeArchiveError`; ``__MACOSX/`` members are skipped. Members are written into a
  temporary sibling of the target folder and then moved into the target member-wise with
  :func:`os.replace`, so existing content there is kept (the SBD labels land inside the VOC tree).
  A JSON marker file is written last: **a tree without its marker is incomplete**, and workflow
  rules key on the marker. Extracting again while the marker exists does nothing; delete the
  marker to force a new extraction.
* :func:`prepare` does both for one registered archive (:data:`ARCHIVES`) and puts the result in
  the conventional layout under a data folder::

      <data_dir>/downloads/<archive file>            archives (+ <archive file>.sha256)
      <data_dir>/voc12/VOCdevkit/VOC2012/            VOC 2012 trainval
      <data_dir>/voc12/VOCdevkit/VOC2012/SegmentationClassAug/   SBD-derived labels
      <data_dir>/coco14/{train2014,val2014,annotations}/         COCO 2014

Checksum policy (sha256 and trust on first use)
-----------------------------------------------
Published checksums (md5 for VOC and COCO) are built into :data:`ARCHIVES`. After every
verified download the file's sha256 is written next to it as ``<file>.sha256`` (``sha256sum``
format). The expected sha256 of a file is, in order of precedence:

1. a ``sha256`` given by the caller (argument, ``--sha256``, or a value pinned in the workflow
   config) — it overrides everything and, once verified, replaces the recorded value;
2. the ``sha256`` of the archive spec;
3. the value recorded in ``<file>.sha256`` by an earlier run.

So an archive without a published checksum (the SBD ``SegmentationClassAug.zip`` on Dropbox) is
*trusted on first use*: the first download is accepted (after the size check, if a size is
known) and its sha256 recorded; every later run — a re-download after the file was deleted, or
the check of a file already present — must match the recorded value, so a changed upstream file
is detected. To accept a new upstream file, delete ``<file>.sha256`` (or pin the new value).

Command line (for workflow rules)::

    python -m wsss.data.download NAME --data-dir DIR [--url URL] [--size N] [--md5 HEX] [--sha256 HEX]

prints the marker path and exits non-zero with a one-line message on error.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import http.client
import os
import re
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from tqdm import tqdm

from .. import __version__
from ..io import DataError, write_json_atomic, write_text_atomic

CHUNK = 1 << 20  # bytes per read, for both downloading and hashing
MARKER_FORMAT = 1


# --------------------------------------------------------------------------------------------
# errors


class DownloadError(RuntimeError):
    """A file could not be fetched (no network, HTTP error, transfer cut short)."""


class ChecksumError(DownloadError):
    """A file's size or checksum differs from the expected value; the message names the file."""

    def __init__(self, path: Path, what: str, expected: object, actual: object, note: str = ""):
        self.path, self.what, self.expected, self.actual = Path(path), what, expected, actual
        super().__init__(f"{what} mismatch for {path}: expected {expected}, got {actual}{note}")


class ExtractError(DataError):
    """An archive could not be extracted as asked (nothing matched, file/folder conflicts)."""


class UnsafeArchiveError(ExtractError):
    """An archive member would escape the target folder or is a link/device; nothing is extracted."""


# --------------------------------------------------------------------------------------------
# the archive registry


@dataclass(frozen=True)
class ArchiveSpec:
    """One downloadable archive and where :func:`prepare` puts its contents.

    ``size``/``md5``/``sha256`` are ``None`` where nothing is published. ``subdir`` is the target
    folder relative to the data folder that members are merged into (paths inside the archive are
    kept); ``members_prefix`` restricts extraction to members under that folder of the archive.
    """

    name: str
    url: str
    size: Optional[int]
    md5: Optional[str]
    sha256: Optional[str]
    filename: str
    subdir: str = "."
    members_prefix: Optional[str] = None

    def with_overrides(self, *, url: str | None = None, size: int | None = None,
                       md5: str | None = None, sha256: str | None = None) -> "ArchiveSpec":
        """A copy with the given (non-``None``) values replaced, e.g. for a mirror URL."""
        changes = {k: v for k, v in dict(url=url, size=size, md5=md5, sha256=sha256).items() if v is not None}
        return dataclasses.replace(self, **changes)


ARCHIVES: Dict[str, ArchiveSpec] = {
    s.name: s
    for s in [
        ArchiveSpec(
            name="voc2012_trainval",
            url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            size=1_999_639_040,
            md5="6cd6e144f989b92b3379bac3b3de84fd",
            sha256=None,
            filename="VOCtrainval_11-May-2012.tar",
            subdir="voc12",
            members_prefix="VOCdevkit/VOC2012",
        ),
        ArchiveSpec(
            # No published checksum: trust on first use (see the module docstring).
            name="sbd_aug",
            url="https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
            size=None,
            md5=None,
            sha256=None,
            filename="SegmentationClassAug.zip",
            subdir="voc12/VOCdevkit/VOC2012",
            members_prefix="SegmentationClassAug",
        ),
        ArchiveSpec(
            # The PFAN saliency maps of VOC 2012 that EPS (halbielee/EPS README, "Saliency maps")
            # and SMAF (bupt-ai-cz/SMAF, dataset/VOC2012/SALImages) train on, from the EPS authors'
            # Google Drive. No published checksum: trust on first use (download.saliency_sha256 pins it).
            name="voc12_saliency",
            url="https://drive.usercontent.google.com/download?id=19AjSmgdMlIZH4FXVZ5zjlUZcoZZCkwrI&export=download&confirm=t",
            size=None,
            md5=None,
            sha256=None,
            filename="SALImages.zip",
            subdir="voc12/VOCdevkit/VOC2012",
            members_prefix="SALImages",
        ),
        ArchiveSpec(
            name="coco2014_train",
            url="http://images.cocodataset.org/zips/train2014.zip",
            size=13_510_573_713,
            md5="0da8c0bd3d6becc4dcb32757491aca88",
            sha256=None,
            filename="train2014.zip",
            subdir="coco14",
            members_prefix="train2014",
        ),
        ArchiveSpec(
            name="coco2014_val",
            url="http://images.cocodataset.org/zips/val2014.zip",
            size=6_645_013_297,
            md5="a3d79f5ed8d289b7a7554ce06a5782b3",
            sha256=None,
            filename="val2014.zip",
            subdir="coco14",
            members_prefix="val2014",
        ),
        ArchiveSpec(
            name="coco2014_annotations",
            url="http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
            size=252_872_794,
            md5="0a379cfc70b0e71301e0f377548639bd",
            sha256=None,
            filename="annotations_trainval2014.zip",
            subdir="coco14",
            members_prefix="annotations",
        ),
    ]
}


def get_archive(name: str, *, url: str | None = None, size: int | None = None,
                md5: str | None = None, sha256: str | None = None) -> ArchiveSpec:
    """The registered spec ``name``, with any non-``None`` override applied.

    An unknown name raises ``KeyError`` listing the valid names.
    """
    try:
        spec = ARCHIVES[name]
    except KeyError:
        raise KeyError(f"unknown archive {name!r}; valid names: {', '.join(sorted(ARCHIVES))}") from None
    return spec.with_overrides(url=url, size=size, md5=md5, sha256=sha256)


# --------------------------------------------------------------------------------------------
# checksums


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _suffixed(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def read_recorded_sha256(path: str | os.PathLike) -> Optional[str]:
    """The sha256 recorded next to ``path`` (``<path>.sha256``) by an earlier download, if any."""
    side = _sidecar(Path(path))
    if not side.exists():
        return None
    fields = side.read_text().split()
    if not fields or not re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
        raise DataError(f"{side} does not hold a sha256 (64 hex digits); delete it to record a new one")
    return fields[0].lower()


def hash_file(path: str | os.PathLike, algorithms: Sequence[str] = ("sha256",), *,
              progress: bool = False) -> Dict[str, str]:
    """Hex digests of ``path`` for each algorithm, computed in one streaming pass."""
    path = Path(path)
    hashers = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                    unit_divisor=1024, desc=f"verify {path.name}",
                                    disable=not progress, leave=False) as bar:
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
            bar.update(len(chunk))
    return {a: h.hexdigest() for a, h in hashers.items()}


def _verify(path: Path, size: Optional[int], md5: Optional[str], sha256: Optional[str],
            progress: bool) -> Dict[str, str]:
    """Check size, then md5/sha256; return the digests (sha256 always, md5 when expected)."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(path, "size", f"{size} bytes", f"{actual_size} bytes")
    digests = hash_file(path, ("md5", "sha256") if md5 else ("sha256",), progress=progress)
    for algo, expected in (("md5", md5), ("sha256", sha256)):
        if expected and digests[algo] != expected.lower():
            raise ChecksumError(path, algo, expected.lower(), digests[algo])
    return digests


# --------------------------------------------------------------------------------------------
# download


def _offline_error(url: str, dest: Path, reason: object, size: Optional[int], md5: Optional[str],
                   sha256: Optional[str]) -> DownloadError:
    if isinstance(reason, socket.gaierror):
        what = f"could not resolve the host ({reason})"
    elif isinstance(reason, ConnectionRefusedError):
        what = f"connection refused ({reason})"
    elif isinstance(reason, (TimeoutError, socket.timeout)):
        what = f"timed out ({reason})"
    else:
        what = str(reason)
    checks = ", ".join(f"{k} {v}" for k, v in (("size", size), ("md5", md5), ("sha256", sha256)) if v)
    return DownloadError(
        f"cannot download {url}: {what}. This machine seems to be offline (or the server is "
        f"unreachable). To install the file by hand, fetch it on a machine with network access and "
        f"place it at {dest}" + (f" (expected {checks})" if checks else "") + ", then run again."
    )


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": f"wsss/{__version__} (python-urllib)"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _fetch(url: str, part: Path, expected_size: Optional[int], timeout: float, progress: bool,
           dest: Path, md5: Optional[str], sha256: Optional[str]) -> None:
    """Stream ``url`` into ``part``, resuming from its current length when the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        offset = 0  # longer than the whole file: not a prefix of it
    if expected_size is not None and offset == expected_size:
        return  # already complete; the caller verifies it
    try:
        try:
            resp = _open(url, offset, timeout)
        except urllib.error.HTTPError as e:
            if e.code != 416 or not offset:
                raise
            offset = 0  # range not satisfiable: the part file is useless, start over
            resp = _open(url, 0, timeout)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download {url}: the server answered HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        if urllib.parse.urlparse(url).scheme == "file":
            raise DownloadError(f"cannot read {url}: {e.reason}") from e
        raise _offline_error(url, dest, e.reason, expected_size, md5, sha256) from e
    except (OSError, http.client.HTTPException) as e:
        raise _offline_error(url, dest, e, expected_size, md5, sha256) from e

    with resp:
        status = getattr(resp, "status", None)
        length = resp.headers.get("Content-Length")
        length = int(length) if length is not None and length.isdigit() else None
        total: Optional[int] = None
        if offset and status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                # A range we did not ask for: drop the part file and fetch it whole.
                resp.close()
                part.unlink()
                return _fetch(url, part, expected_size, timeout, progress, dest, md5, sha256)
            total = int(m.group(3)) if m.group(3) != "*" else None
        else:
            offset = 0  # 200 (or file://): the body is the whole file
            total = length
        if expected_size is not None and total is not None and total != expected_size:
            raise ChecksumError(dest, "size", f"{expected_size} bytes",
                                f"{total} bytes (as reported by the server for {url})",
                                "; wrong URL or mirror? Pass the right size/checksum to override")
        received = 0
        try:
            with open(part, "ab" if offset else "wb") as f, tqdm(
                total=expected_size or total, initial=offset, unit="B", unit_scale=True,
                unit_divisor=1024, desc=dest.name, disable=not progress, leave=False,
            ) as bar:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise DownloadError(
                f"download of {url} was interrupted after {offset + received} bytes ({e}); the "
                f"partial file is kept at {part} and the next run resumes from there"
            ) from e
        if length is not None and received < length:
            raise DownloadError(
                f"download of {url} stopped after {offset + received} of {offset + length} bytes; "
                f"the partial file is kept at {part} and the next run resumes from there"
            )


def download(spec_or_url: ArchiveSpec | str, dest_path: str | os.PathLike, *,
             size: int | None = None, md5: str | None = None, sha256: str | None = None,
             timeout: float = 60, progress: bool = True) -> Path:
    """Fetch ``spec_or_url`` to ``dest_path`` (the final file name), verified; return the path.

    ``size``/``md5``/``sha256`` override the spec's values. See the module docstring for the
    resume, verification and sha256 trust-on-first-use rules. Raises :class:`DownloadError` (no
    network, HTTP error, interrupted transfer — the ``.part`` file is kept) or
    :class:`ChecksumError` (the download is kept as ``<dest>.corrupt``; an already present
    ``dest`` that fails the check is left alone).
    """
    if isinstance(spec_or_url, ArchiveSpec):
        spec = spec_or_url.with_overrides(size=size, md5=md5, sha256=sha256)
        url, size, md5, sha256 = spec.url, spec.size, spec.md5, spec.sha256
    else:
        url = spec_or_url
    dest = Path(dest_path)
    pinned = sha256.lower() if sha256 else None
    expected_sha256 = pinned or read_recorded_sha256(dest)

    if dest.exists():
        try:
            digests = _verify(dest, size, md5, expected_sha256, progress)
        except ChecksumError as e:
            raise ChecksumError(dest, e.what, e.expected, e.actual,
                                "; the file is already present but does not match: delete it to "
                                "download it again (or pin the right checksum)") from None
        _record_sha256(dest, digests["sha256"])
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _suffixed(dest, ".part")
    _fetch(url, part, size, timeout, progress, dest, md5, expected_sha256)

    if size is not None and part.stat().st_size < size:
        raise DownloadError(
            f"download of {url} is incomplete ({part.stat().st_size} of {size} bytes); the partial "
            f"file is kept at {part} and the next run resumes from there"
        )
    try:
        digests = _verify(part, size, md5, expected_sha256, progress)
    except ChecksumError as e:
        corrupt = _suffixed(dest, ".corrupt")
        os.replace(part, corrupt)
        raise ChecksumError(dest, e.what, e.expected, e.actual,
                            f" (downloaded from {url}); the download was kept as {corrupt} for "
                            "inspection; delete it and check the URL and checksum") from None
    os.replace(part, dest)
    _record_sha256(dest, digests["sha256"])
    return dest


def _record_sha256(path: Path, digest: str) -> None:
    side = _sidecar(path)
    text = f"{digest}  {path.name}\n"
    if not side.exists() or side.read_text() != text:
        write_text_atomic(side, text)


# --------------------------------------------------------------------------------------------
# extraction


def _member_parts(name: str) -> Tuple[str, ...]:
    """Split an archive member name into safe path parts, or raise :class:`UnsafeArchiveError`."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or re.match(r"[A-Za-z]:", raw):
        raise UnsafeArchiveError(f"refusing archive member {name!r}: absolute path")
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"refusing archive member {name!r}: '..' path component")
    return parts


def _iter_members(archive: Path) -> Iterator[Tuple[Tuple[str, ...], bool, Optional[BinaryIO]]]:
    """Yield ``(parts, is_dir, file object or None)`` per member; unsafe members raise."""
    # Tar first: a tar whose last member is a zip can pass zipfile.is_zipfile, never the reverse.
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                parts = _member_parts(m.name)
                if m.issym():
                    raise UnsafeArchiveError(f"refusing archive member {m.name!r}: symlink to {m.linkname!r}")
                if m.islnk():
                    raise UnsafeArchiveError(f"refusing archive member {m.name!r}: hardlink to {m.linkname!r}")
                if m.isdir():
                    yield parts, True, None
                elif m.isreg():
                    with tf.extractfile(m) as f:
                        yield parts, False, f
                else:
                    raise UnsafeArchiveError(f"refusing archive member {m.name!r}: device, fifo or other special file")
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                parts = _member_parts(info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise UnsafeArchiveError(f"refusing archive member {info.filename!r}: symlink")
                if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise UnsafeArchiveError(f"refusing archive member {info.filename!r}: device, fifo or socket")
                if info.is_dir():
                    yield parts, True, None
                else:
                    with zf.open(info) as f:
                        yield parts, False, f
    else:
        raise ExtractError(f"{archive} is neither a tar (any compression) nor a zip archive")


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.move(src, dst)  # target folder is a symlink onto another file system


def _merge_into(src: Path, dst: Path) -> None:
    """Move the contents of ``src`` into ``dst``, folder by folder, keeping what ``dst`` holds."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        s, d = Path(entry.path), dst / entry.name
        if entry.is_dir(follow_symlinks=False):
            if d.is_dir():
                _merge_into(s, d)
                continue
            if d.exists() or d.is_symlink():
                raise ExtractError(f"cannot extract folder {d}: a file of that name exists")
            try:
                _move(s, d)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not d.is_dir():
                    raise
                _merge_into(s, d)  # created meanwhile by a concurrent extraction
        else:
            if d.is_dir():
                raise ExtractError(f"cannot extract file {d}: a folder of that name exists")
            _move(s, d)


def safe_extract(archive_path: str | os.PathLike, dest_dir: str | os.PathLike, *,
                 members_prefix: str | None = None, marker_name: str = ".complete",
                 checksums: Mapping[str, str] | None = None, progress: bool = False) -> Path:
    """Extract a tar (any compression) or zip archive into ``dest_dir``; return the marker path.

    ``dest_dir`` is the target folder the caller chooses; member paths are kept below it and
    merged with what is already there (existing files of the same name are replaced, others kept).
    ``members_prefix`` (a folder inside the archive, e.g. ``"SegmentationClassAug"``) limits
    extraction to members below it; matching nothing is an error. ``__MACOSX/`` members are
    skipped. Unsafe members raise :class:`UnsafeArchiveError` and nothing reaches ``dest_dir``.
    ``checksums`` (e.g. the verified md5/sha256) are recorded in the marker
    ``dest_dir/marker_name``, a JSON file written last. If the marker exists, nothing is done.
    """
    archive, dest = Path(archive_path), Path(dest_dir)
    marker = dest / marker_name
    if marker.exists():
        return marker
    if not archive.is_file():
        raise ExtractError(f"archive not found: {archive}")
    prefix = _member_parts(members_prefix) if members_prefix else ()

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-extract-{dest.name}-", dir=dest.parent))
    n_files = n_dirs = n_skipped = 0
    try:
        with tqdm(unit=" files", desc=f"extract {archive.name}", disable=not progress, leave=False) as bar:
            for parts, is_dir, fobj in _iter_members(archive):
                if not parts:
                    continue
                if parts[0] == "__MACOSX" or parts[: len(prefix)] != prefix:
                    n_skipped += 1
                    continue
                target = tmp.joinpath(*parts)
                if is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    n_dirs += 1
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "wb") as out:
                        shutil.copyfileobj(fobj, out, CHUNK)
                    n_files += 1
                bar.update()
        if prefix and not n_files:
            raise ExtractError(f"{archive} has no files under {members_prefix!r}; is it the right archive?")
        _merge_into(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    write_json_atomic(marker, {
        "format": MARKER_FORMAT,
        "archive": archive.name,
        "archive_path": str(archive.resolve()),
        "size": archive.stat().st_size,
        "checksums": dict(checksums or {}),
        "members_prefix": members_prefix,
        "files": n_files,
        "dirs": n_dirs,
        "skipped": n_skipped,
        "wsss_version": __version__,
        "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return marker


# --------------------------------------------------------------------------------------------
# one archive, end to end


def marker_path(name: str, data_dir: str | os.PathLike) -> Path:
    """Where :func:`prepare` writes the completion marker of archive ``name``."""
    spec = get_archive(name)
    return Path(data_dir) / spec.subdir / f".{spec.name}.complete"


def prepare(name: str, data_dir: str | os.PathLike, *, url: str | None = None, size: int | None = None,
            md5: str | None = None, sha256: str | None = None, timeout: float = 60,
            progress: bool = True) -> Path:
    """Download (to ``<data_dir>/downloads/``) and extract archive ``name``; return its marker.

    ``url``/``size``/``md5``/``sha256`` override the registered values (mirrors, pinned sha256).
    Nothing is done when the marker already exists.
    """
    spec = get_archive(name, url=url, size=size, md5=md5, sha256=sha256)
    marker = marker_path(name, data_dir)
    if marker.exists():
        return marker
    archive = download(spec, Path(data_dir) / "downloads" / spec.filename, timeout=timeout, progress=progress)
    checksums = {"sha256": read_recorded_sha256(archive)}
    if spec.md5:
        checksums["md5"] = spec.md5.lower()
    return safe_extract(archive, marker.parent, members_prefix=spec.members_prefix,
                        marker_name=marker.name, checksums=checksums, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wsss.data.download",
        description="Download, verify and extract one dataset archive into the conventional layout "
                    "under --data-dir; prints the completion marker's path.",
    )
    parser.add_argument("name", choices=sorted(ARCHIVES), help="archive to prepare")
    parser.add_argument("--data-dir", type=Path, required=True, help="data folder (archives go to DIR/downloads)")
    parser.add_argument("--url", type=str, default=None, help="download from this URL instead (mirror, file://)")
    parser.add_argument("--size", type=int, default=None, help="expected size in bytes (overrides the registry)")
    parser.add_argument("--md5", type=str, default=None, help="expected md5 (overrides the registry)")
    parser.add_argument("--sha256", type=str, default=None, help="expected sha256 (pins it; overrides the recorded value)")
    parser.add_argument("--timeout", type=float, default=60, help="network timeout in seconds (default: 60)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        marker = prepare(args.name, args.data_dir, url=args.url, size=args.size, md5=args.md5,
                         sha256=args.sha256, timeout=args.timeout, progress=not args.no_progress)
    except (DownloadError, DataError, OSError) as e:  # OSError: disk full, permissions
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
