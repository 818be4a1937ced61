"""File layout of the workflow: where datasets and stage outputs live (pure functions of config)."""

from __future__ import annotations

from typing import Any, List, Mapping

from ..config import dataset_root


def dataset_markers(cfg: Mapping[str, Any]) -> List[str]:
    """Files whose existence says the configured dataset is complete.

    A user-given synthetic ``dataset.root`` is taken as complete. For VOC the derived
    ``train_aug`` list and for COCO the semantic masks are built in a user-given root too.
    """
    d = cfg["dataset"]
    root = dataset_root(cfg)
    if d["name"] == "synthetic":
        return [] if d["root"] else [str(root / ".complete")]
    if d["name"] == "voc12":
        return [str(root / "ImageSets" / "Segmentation" / "train_aug.txt")]
    if d["name"] == "coco14":
        return [str(root / "mask" / ".complete")]
    raise ValueError(f"unknown dataset {d['name']!r}")


#: Archives each dataset downloads (names of ``wsss.data.download.ARCHIVES``).
ARCHIVES_OF = {
    "synthetic": [],
    "voc12": ["voc2012_trainval", "sbd_aug"],
    "coco14": ["coco2014_train", "coco2014_val", "coco2014_annotations"],
}


def archive_marker(cfg: Mapping[str, Any], archive: str) -> str:
    from ..data.download import marker_path

    return str(marker_path(archive, cfg["dataset"]["data_dir"]))


def download_options(cfg: Mapping[str, Any], archive: str) -> dict:
    """Keyword overrides of :func:`wsss.data.download.prepare` from the ``download`` section."""
    d = cfg["download"]
    opts: dict = {"timeout": d["timeout"]}
    if archive in d["urls"]:
        opts["url"] = d["urls"][archive]
    if archive == "sbd_aug" and d["sbd_sha256"]:
        opts["sha256"] = d["sbd_sha256"]
    return opts


def archive_inputs(cfg: Mapping[str, Any]):
    """Archive markers a dataset-building rule waits for (none when ``dataset.root`` is given)."""
    if cfg["dataset"]["root"]:
        return []
    return [archive_marker(cfg, a) for a in ARCHIVES_OF[cfg["dataset"]["name"]]]
