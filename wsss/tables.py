"""Result tables: one summary row per experiment, gathered from every stage's metrics files.

``summary.csv`` columns (fractions in [0, 1], NaN where a stage did not run for an experiment):
``seed_miou`` (at ``seed_threshold``, chosen with ground truth), ``crf_miou``, ``ir_label_precision``
and ``ir_label_coverage`` (confident pixels), ``ir_label_miou``, ``irn_miou``, ``deeplab_miou``,
``deeplab_jf``, ``deeplab_pseudo_masks``, ``weak_full_ratio`` (DeepLab mIoU over that of the
fully supervised experiment named in ``tables.fully_supervised``), and ``time_<stage>_s``: wall
seconds of each stage from Snakemake's benchmark files (sharded stages summed over shards).
``summary.md`` is the same table in Markdown.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

from . import __version__
from .io import atomic_path, write_text_atomic

#: Benchmark file stems (before ``-<shard>``) of each stage.
STAGES = ("train_classifier", "cam_shard", "crf_shard", "ir_labels_shard", "train_irn", "irn_masks_shard",
          "train_deeplab", "deeplab_predict_shard")


def _metric(path: Path, column: str) -> float:
    if not path.exists():
        return math.nan
    df = pd.read_csv(path)
    return float(df[column].iloc[0]) if column in df.columns else math.nan


def stage_times(bench_dir: Path) -> Dict[str, float]:
    times: Dict[str, float] = {}
    for stage in STAGES:
        files = list(bench_dir.glob(f"{stage}.tsv")) + list(bench_dir.glob(f"{stage}-*.tsv"))
        total = sum(float(pd.read_csv(f, sep="\t")["s"].iloc[-1]) for f in files)
        times[f"time_{stage}_s"] = round(total, 1) if files else math.nan
    return times


def experiment_row(results: Path, experiment: str) -> Dict[str, object]:
    d = results / experiment
    row: Dict[str, object] = {"experiment": experiment}
    sweep = d / "seeds" / "threshold_sweep.csv"
    if sweep.exists():
        s = pd.read_csv(sweep)
        chosen = s[s["chosen_with_gt"]].iloc[0]
        row.update(seed_threshold=float(chosen["threshold"]), seed_miou=float(chosen["miou"]))
    else:
        row.update(seed_threshold=math.nan, seed_miou=math.nan)
    row["crf_miou"] = _metric(d / "crf" / "metrics.csv", "miou")
    ir = d / "irn" / "ir_labels" / "metrics.csv"
    row["ir_label_precision"] = _metric(ir, "confident_pixel_accuracy")
    row["ir_label_coverage"] = _metric(ir, "coverage")
    row["ir_label_miou"] = _metric(ir, "miou_confident")
    row["irn_miou"] = _metric(d / "irn" / "masks" / "metrics.csv", "miou")
    dl = d / "deeplab" / "metrics.csv"
    row["deeplab_miou"] = _metric(dl, "miou")
    row["deeplab_jf"] = _metric(dl, "JF")
    row["deeplab_pseudo_masks"] = pd.read_csv(dl)["pseudo_masks"].iloc[0] if dl.exists() else ""
    row.update(stage_times(d / "benchmarks"))
    return row


def summary_table(results: str | Path, experiments: Sequence[str], fully_supervised: Optional[str] = None) -> pd.DataFrame:
    rows: List[Dict[str, object]] = [experiment_row(Path(results), e) for e in experiments]
    df = pd.DataFrame(rows)
    if fully_supervised:
        if fully_supervised not in list(experiments):
            raise KeyError(f"tables.fully_supervised names {fully_supervised!r}, which is not an experiment; configured: {list(experiments)}")
        full = float(df.loc[df["experiment"] == fully_supervised, "deeplab_miou"].iloc[0])
        df["weak_full_ratio"] = df["deeplab_miou"] / full
    else:
        df["weak_full_ratio"] = math.nan
    df["package_version"] = __version__
    return df


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (percent for metrics, seconds for times); no extra dependency."""
    def fmt(col: str, v: object) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "–"
            if col.startswith("time_"):
                return f"{v:.0f}"
            if col in ("seed_threshold",):
                return f"{v:.2f}"
            return f"{100 * v:.1f}"
        return str(v)

    cols = [c for c in df.columns if c != "package_version"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(fmt(c, r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n\nMetrics in percent, times in seconds; wsss " + __version__ + ".\n"


def write_summary(results: str | Path, experiments: Sequence[str], csv_path: str | Path, md_path: str | Path, fully_supervised: Optional[str] = None) -> pd.DataFrame:
    df = summary_table(results, experiments, fully_supervised)
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    write_text_atomic(md_path, to_markdown(df))
    return df
