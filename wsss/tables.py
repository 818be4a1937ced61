"""Result tables: one summary row per experiment, gathered from every stage's metrics files.

``summary.csv`` columns (fractions in [0, 1], NaN where a stage did not run for an experiment):
``seed_miou`` (at ``seed_threshold``, chosen with ground truth), ``crf_miou``, ``ir_label_precision``
and ``ir_label_coverage`` (confident pixels), ``ir_label_miou``, ``irn_miou``, ``affinitynet_miou``, ``deeplab_miou``,
``deeplab_jf``, ``deeplab_pseudo_masks``, ``weak_full_ratio`` (DeepLab mIoU over that of the
fully supervised experiment named in ``tables.fully_supervised``), and ``time_<stage>_s``: wall
seconds of each stage from Snakemake's benchmark files (sharded stages summed over shards).
``summary.md`` is the same table in Markdown. Rows are runs (``<experiment>/s<seed>``);
``ablation.csv`` has one row per experiment with ``<metric>_mean`` and ``<metric>_std`` over seeds
(and ``ablation.md`` shows them as mean ± std).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

from . import __version__
from .csvio import read_csv_checked
from .io import atomic_path, write_text_atomic

#: Benchmark file stems (before ``-<shard>``) of each stage.
STAGES = (
    "train_classifier",
    "cam_shard",
    "crf_shard",
    "ir_labels_shard",
    "train_irn",
    "irn_masks_shard",
    "affinity_labels_shard",
    "train_affinitynet",
    "affinitynet_masks_shard",
    "train_deeplab",
    "deeplab_predict_shard",
)


def _metrics(path: Path, columns: Sequence[str]) -> Dict[str, object]:
    """``columns`` of the one data row of the metrics file ``path``; NaN for each when it does not exist.

    A metrics file that exists must hold every column asked for and exactly one data row, else
    :class:`~wsss.io.DataError` names the file (a cut or damaged file is never read as a number).
    Values are as written (a metric the stage wrote as ``nan`` stays NaN).
    """
    if not path.exists():
        return {c: math.nan for c in columns}
    df = read_csv_checked(path, columns, rows=1, what="metrics file")
    return {c: df[c].iloc[0] for c in columns}


def _metric(path: Path, column: str) -> float:
    """One number of the metrics file ``path`` (see :func:`_metrics`)."""
    return float(_metrics(path, [column])[column])


def stage_times(bench_dir: Path) -> Dict[str, float]:
    """Wall seconds of each stage from Snakemake's benchmark TSVs (the last repeat's ``s``; shards summed).

    A benchmark file without an ``s`` column, without data rows, cut mid-row or with an empty
    ``s`` raises :class:`~wsss.io.DataError` naming it.
    """
    times: Dict[str, float] = {}
    for stage in STAGES:
        files = sorted(bench_dir.glob(f"{stage}.tsv")) + sorted(bench_dir.glob(f"{stage}-*.tsv"))
        total = sum(
            float(read_csv_checked(f, ["s"], sep="\t", nonnull=["s"], what="benchmark file")["s"].iloc[-1])
            for f in files
        )
        times[f"time_{stage}_s"] = round(total, 1) if files else math.nan
    return times


def experiment_row(results: Path, run: str) -> Dict[str, object]:
    """Metrics of one run (``<experiment>/s<seed>``, the results subfolder).

    A stage whose metrics file does not exist gives NaN; a file that exists but is damaged (empty,
    cut, a missing column, the wrong number of rows) raises :class:`~wsss.io.DataError` naming it.
    """
    from .seeds import read_sweep, sweep_chosen_row

    d = results / run
    name, sep, seed = run.rpartition("/s")
    row: Dict[str, object] = {
        "run": run,
        "experiment": name if sep else run,
        "seed": int(seed) if sep and seed.isdigit() else math.nan,
    }
    sweep = d / "seeds" / "threshold_sweep.csv"
    if sweep.exists():
        chosen = sweep_chosen_row(read_sweep(sweep), source=sweep)
        row.update(seed_threshold=float(chosen["threshold"]), seed_miou=float(chosen["miou"]))
    else:
        row.update(seed_threshold=math.nan, seed_miou=math.nan)
    row["crf_miou"] = _metric(d / "crf" / "metrics.csv", "miou")
    ir = _metrics(d / "irn" / "ir_labels" / "metrics.csv", ["confident_pixel_accuracy", "coverage", "miou_confident"])
    row["ir_label_precision"] = float(ir["confident_pixel_accuracy"])
    row["ir_label_coverage"] = float(ir["coverage"])
    row["ir_label_miou"] = float(ir["miou_confident"])
    row["irn_miou"] = _metric(d / "irn" / "masks" / "metrics.csv", "miou")
    row["affinitynet_miou"] = _metric(d / "affinitynet" / "masks" / "metrics.csv", "miou")
    dl_path = d / "deeplab" / "metrics.csv"
    dl = _metrics(dl_path, ["miou", "JF", "pseudo_masks"])
    row["deeplab_miou"] = float(dl["miou"])
    row["deeplab_jf"] = float(dl["JF"])
    row["deeplab_pseudo_masks"] = dl["pseudo_masks"] if dl_path.exists() else ""
    row.update(stage_times(d / "benchmarks"))
    return row


def summary_table(results: str | Path, runs: Sequence[str], fully_supervised: Optional[str] = None) -> pd.DataFrame:
    """One row per run. The weak/full ratio divides by the fully supervised experiment's DeepLab
    mIoU of the same seed (or its mean over seeds when that seed was not run)."""
    rows: List[Dict[str, object]] = [experiment_row(Path(results), r) for r in runs]
    df = pd.DataFrame(rows)
    if fully_supervised:
        full = df[df["experiment"] == fully_supervised]
        if full.empty:
            raise KeyError(
                f"tables.fully_supervised names {fully_supervised!r}, which is not an experiment; configured: {sorted(set(df['experiment']))}"
            )
        by_seed = dict(zip(full["seed"], full["deeplab_miou"]))
        mean = float(full["deeplab_miou"].mean())
        df["weak_full_ratio"] = [m / by_seed.get(s, mean) for m, s in zip(df["deeplab_miou"], df["seed"])]
    else:
        df["weak_full_ratio"] = math.nan
    df["package_version"] = __version__
    return df


def ablation_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean and (sample) standard deviation over seeds of every metric, one row per experiment."""
    metrics = [
        c
        for c in summary.columns
        if c not in ("run", "experiment", "seed", "deeplab_pseudo_masks", "package_version")
        and pd.api.types.is_numeric_dtype(summary[c])
    ]
    g = summary.groupby("experiment", sort=False)
    out = pd.DataFrame({"experiment": list(g.groups), "n_seeds": g.size().values})
    for c in metrics:
        out[f"{c}_mean"] = g[c].mean().values
        out[f"{c}_std"] = g[c].std(ddof=1).values if len(summary) else math.nan
    out["package_version"] = __version__
    return out


def ablation_markdown(ab: pd.DataFrame) -> str:
    cols = [c[: -len("_mean")] for c in ab.columns if c.endswith("_mean") and not c.startswith("time_")]
    lines = ["| experiment | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for _, r in ab.iterrows():
        cells = []
        for c in cols:
            m, sd = r[f"{c}_mean"], r[f"{c}_std"]
            if math.isnan(m):
                cells.append("–")
            elif c == "seed_threshold":
                cells.append(f"{m:.2f}")
            else:
                cells.append(f"{100 * m:.1f}" + ("" if math.isnan(sd) else f" ± {100 * sd:.1f}"))
        lines.append(f"| {r['experiment']} | {int(r['n_seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nMean ± sample standard deviation over seeds, in percent; wsss " + __version__ + ".\n"


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (percent for metrics, seconds for times); no extra dependency."""

    def fmt(col: str, v: object) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "–"
            if col.startswith("time_"):
                return f"{v:.0f}"
            if col == "seed":
                return f"{v:.0f}"
            if col in ("seed_threshold",):
                return f"{v:.2f}"
            return f"{100 * v:.1f}"
        return str(v)

    cols = [c for c in df.columns if c not in ("package_version", "run")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(fmt(c, r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n\nMetrics in percent, times in seconds; wsss " + __version__ + ".\n"


def write_summary(
    results: str | Path,
    runs: Sequence[str],
    csv_path: str | Path,
    md_path: str | Path,
    fully_supervised: Optional[str] = None,
    ablation_csv: Optional[str | Path] = None,
    ablation_md: Optional[str | Path] = None,
) -> pd.DataFrame:
    df = summary_table(results, runs, fully_supervised)
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    write_text_atomic(md_path, to_markdown(df))
    if ablation_csv is not None:
        ab = ablation_table(df)
        with atomic_path(ablation_csv) as tmp:
            ab.to_csv(tmp, index=False, float_format="%.6g")
        if ablation_md is not None:
            write_text_atomic(ablation_md, ablation_markdown(ab))
    return df
