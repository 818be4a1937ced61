"""Shard markers: the tracked outputs of the mask-producing shard jobs (CRF, IR labels, IRN masks,
seed masks, DeepLab predictions).

Each job writes one PNG per image into a folder named after the config hash of its stage
(:func:`masks_dir`) and one JSON marker (:func:`write_shard_marker`) that names the folder, the ids
it wrote and the ids it left out on purpose; later stages read the markers
(:func:`read_shard_markers_full`), never the folder listing. :func:`shard_journal` is the
per-job journal (:mod:`wsss.workflow.journal`) a resumed shard job keeps its own PNGs with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import __version__
from ..config import config_hash
from ..io import DataError, write_json_atomic
from .journal import journal_for


def masks_dir(base: str | Path, resolved: Mapping[str, Any]) -> Path:
    """``<base>/masks-<config hash>``: masks made with other settings never mix with these, and a
    resumed shard only reuses PNGs made with the same settings."""
    return Path(base) / f"masks-{config_hash(resolved)}"


def write_shard_marker(
    path: str | Path,
    *,
    kind: str,
    ids: Sequence[str],
    mask_dir: Path,
    resolved: Mapping[str, Any],
    skipped: Sequence[str] = (),
) -> None:
    """The tracked output of a mask-producing shard: its folder, the ids it wrote and the ids it
    left out on purpose (``skipped``: unlabelled images the CAM stage skipped)."""
    write_json_atomic(
        path,
        {
            "kind": kind,
            "mask_dir": str(mask_dir),
            "ids": list(ids),
            "num_images": len(ids),
            "skipped": sorted(skipped),
            "config_hash": config_hash(resolved),
            "package_version": __version__,
            "config": dict(resolved),
        },
    )


def shard_journal(marker: str | Path, resolved: Mapping[str, Any], inputs: Sequence[str | Path]):
    """The journal of a mask-producing shard job (:mod:`wsss.workflow.journal`): a resumed job
    keeps only the PNGs it wrote itself with the same config and the same input files; a forced
    rerun or a rerun after an upstream change rewrites every PNG."""
    return journal_for(marker, config_hash=config_hash(resolved), inputs=inputs)


def read_shard_markers(paths: Sequence[str | Path]) -> tuple[Path, list]:
    """The mask folder and ids recorded by shard markers (all shards must share one folder)."""
    mask_dir, ids, _ = read_shard_markers_full(paths)
    return mask_dir, ids


def read_shard_markers_full(paths: Sequence[str | Path]) -> tuple[Path, list, set]:
    """The mask folder, the ids written and the ids skipped on purpose, from shard markers."""
    dirs, ids, skipped = set(), [], set()
    for p in paths:
        try:
            m = json.loads(Path(p).read_text())
            dirs.add(m["mask_dir"])
            ids += m["ids"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"shard marker {p} is unreadable or incomplete ({type(e).__name__}: {e}); rerun its job"
            ) from e
        skipped.update(m.get("skipped", []))
    if len(dirs) != 1:
        raise ValueError(f"shard markers {list(map(str, paths))} point at different mask folders: {sorted(dirs)}")
    return Path(dirs.pop()), ids, skipped
