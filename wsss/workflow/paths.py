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
    if archive == "voc12_saliency" and d.get("saliency_sha256"):
        opts["sha256"] = d["saliency_sha256"]
    return opts


def saliency_archives(cfg: Mapping[str, Any]) -> List[str]:
    """Archives of the default saliency maps (``voc12_saliency`` for a downloaded VOC without a
    ``saliency.root``); their download rules run only when a saliency-trained method asks."""
    if cfg["dataset"]["name"] == "voc12" and not cfg["dataset"]["root"] and not (cfg.get("saliency") or {}).get("root"):
        return ["voc12_saliency"]
    return []


def saliency_inputs(cfg: Mapping[str, Any]) -> List[str]:
    """What the classifier training of a saliency-trained method (EPS) waits for: the given
    ``saliency.root`` folder; the dataset's completion marker for the generated synthetic data
    (the generator writes ``SALImages/``); the ``voc12_saliency`` download marker for a downloaded
    VOC; ``<root>/SALImages`` of a user-given dataset root. COCO has no built-in saliency maps."""
    from ..config import ConfigError, saliency_dir

    if (cfg.get("saliency") or {}).get("root"):
        return [str(saliency_dir(cfg))]
    name = cfg["dataset"]["name"]
    if name == "synthetic" and not cfg["dataset"]["root"]:
        return dataset_markers(cfg)
    if name == "voc12" and not cfg["dataset"]["root"]:
        return [archive_marker(cfg, a) for a in saliency_archives(cfg)]
    if name == "coco14":
        raise ConfigError(
            "dataset coco14 has no built-in saliency maps; set saliency.root to a folder of <id>.png maps"
        )
    return [str(saliency_dir(cfg))]


def archive_inputs(cfg: Mapping[str, Any]):
    """Archive markers a dataset-building rule waits for (none when ``dataset.root`` is given)."""
    if cfg["dataset"]["root"]:
        return []
    return [archive_marker(cfg, a) for a in ARCHIVES_OF[cfg["dataset"]["name"]]]
