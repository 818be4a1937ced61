"""Cost model: projected hours of every workflow stage for PASCAL VOC and COCO, and the ``shards``.

Input: the per-image costs measured by ``bench/scale_rehearsal.py`` (``--figures``, default
``bench/figures/voc_scale_cpu.json``) and, optionally, per-stage GPU figures (``--gpu-figures``,
e.g. ``bench/figures/gpu.json``: the same format, or ``{"device": ..., "stages": {rule:
{"unit": ..., "seconds_per_unit": ..., "overhead_s": ...}}}``).

Model (stated, not measured):

* one job of a stage costs ``overhead + seconds_per_unit x units``. With two rehearsal sizes the
  two are fitted (marginal cost between the sizes, the rest is the per-job overhead: start-up,
  model loading); a non-positive fit, or a single rehearsal, gives overhead 0 and the largest
  rehearsal's seconds per unit;
* a stage with ``gpu=1`` in ``rules/*.smk`` runs on the GPU slots; without GPU figures its
  per-unit cost is the CPU cost divided by ``--gpu-speedup`` (an assumption, printed), its per-job
  overhead is kept; the other stages run on the CPU job slots;
* a sharded stage's jobs run in waves: wall = ceil(shards / slots) x (overhead +
  seconds_per_unit x units / shards); a training stage is one job (one GPU);
* units: per-image stages process the training plus the evaluation split (``cam_ids``), DeepLab
  prediction and seed evaluation the evaluation split, training stages images x epochs of the
  training split (epochs from the config: classifier, IRN, AffinityNet, DeepLab);
* GPU-h = job hours (one GPU each); core-h = job hours x the threads the rehearsal job ran with
  (the rule's threads, at most the rehearsal machine's cores);
* the suggested shards of a ``shards`` key minimise the summed wall time of the stages it splits
  (ties: fewest shards); the total wall is the sum over stages (sequential: an upper bound, the
  CRF branch runs beside the IRN branch).

    python bench/cost_model.py --gpus 4 --cpu-jobs 64
    python bench/cost_model.py --gpus 4 --cpu-jobs 64 --markdown --dataset voc
    python bench/cost_model.py --configfile configs/irn_reference.yaml --gpu-speedup 30
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]

#: dataset -> (training split images, evaluation split images)
DATASETS = {"voc": ("VOC 2012 (train_aug / val)", 10582, 1449), "coco": ("COCO 2014 (train / val)", 82081, 40137)}

#: rule -> (images it processes: train | eval | all, ``shards`` key or None, epochs key path or None)
STAGES: Dict[str, tuple] = {
    "train_classifier": ("train", None, ("classifier", "epochs")),
    "cam_shard": ("all", "cam", None),
    "seed_eval": ("eval", None, None),
    "seed_masks_shard": ("all", "cam", None),
    "crf_shard": ("all", "crf", None),
    "ir_labels_shard": ("all", "irn", None),
    "train_irn": ("train", None, ("irn", "train", "epochs")),
    "irn_masks_shard": ("all", "irn", None),
    "affinity_labels_shard": ("all", "affinitynet", None),
    "train_affinitynet": ("train", None, ("affinitynet", "train", "epochs")),
    "affinitynet_masks_shard": ("all", "affinitynet", None),
    "train_deeplab": ("train", None, ("deeplab", "epochs")),
    "deeplab_predict_shard": ("eval", "deeplab", None),
}


@dataclasses.dataclass(frozen=True)
class StageCost:
    """Cost of one stage's job: ``overhead_s + seconds_per_unit x units`` seconds."""

    rule: str
    unit: str
    seconds_per_unit: float
    overhead_s: float = 0.0
    peak_mib: float = float("nan")


@dataclasses.dataclass(frozen=True)
class RuleInfo:
    threads: int
    gpu: bool


@dataclasses.dataclass(frozen=True)
class Row:
    rule: str
    device: str  # "GPU" or "CPU"
    unit: str
    units: int
    seconds_per_unit: float
    overhead_s: float
    hours: float  # GPU-h or core-h
    wall_h: float
    key: Optional[str]
    shards: int
    source: str  # where the per-unit cost comes from


def rule_info(rules_dir: Path = REPO / "rules") -> Dict[str, RuleInfo]:
    """rule -> threads and whether it requests a GPU (``gpu=1`` in its resources), from rules/*.smk."""
    out = {}
    for smk in sorted(Path(rules_dir).glob("*.smk")):
        for block in re.split(r"^rule ", smk.read_text(), flags=re.M)[1:]:
            name = block.split(":", 1)[0].strip()
            t = re.search(r"^\s+threads:\s*(\d+)", block, flags=re.M)
            out[name] = RuleInfo(int(t.group(1)) if t else 1, bool(re.search(r"^\s+gpu=1,?\s*$", block, flags=re.M)))
    return out


def fit_costs(figures: Mapping[str, Any]) -> Dict[str, StageCost]:
    """rule -> :class:`StageCost` from a figures JSON (``rehearsals`` of scale_rehearsal.py, or ``stages``)."""
    if "stages" in figures and "rehearsals" not in figures:
        return {
            r: StageCost(r, c["unit"], float(c["seconds_per_unit"]), float(c.get("overhead_s", 0.0)))
            for r, c in figures["stages"].items()
        }
    reh = sorted(figures.get("rehearsals", []), key=lambda r: r["images"])
    if not reh:
        raise ValueError(
            "figures hold no rehearsal with stage costs (run bench/scale_rehearsal.py without --skip-stages)"
        )
    out = {}
    for rule in reh[-1]["stages"]:
        pts = [r["stages"][rule] for r in reh if rule in r["stages"]]
        last = pts[-1]
        per, over = float(last["seconds_per_unit"]), 0.0
        if len(pts) > 1 and pts[-1]["units"] != pts[0]["units"]:
            (u1, j1), (u2, j2) = ((p["units"], p["job_seconds"]) for p in (pts[0], pts[-1]))
            slope = (j2 - j1) / (u2 - u1)
            if slope > 0 and j1 - slope * u1 >= 0:
                per, over = slope, j1 - slope * u1
        out[rule] = StageCost(rule, last["unit"], per, over, float(last.get("peak_mib", float("nan"))))
    return out


def rehearsal_cores(figures: Mapping[str, Any], default: int = 2) -> int:
    """Cores of the rehearsal machine (``cores``, or ``machine``: '<host> N CPUs')."""
    if "cores" in figures:
        return int(figures["cores"])
    m = re.search(r"(\d+) CPUs", str(figures.get("machine", "")))
    return int(m.group(1)) if m else default


def stage_units(rule: str, cfg: Mapping[str, Any], n_train: int, n_eval: int) -> int:
    images, _, epochs = STAGES[rule]
    n = {"train": n_train, "eval": n_eval, "all": n_train + n_eval}[images]
    if epochs:
        v: Any = cfg
        for k in epochs:
            v = v[k]
        n *= int(v)
    return n


def job_seconds(cost: StageCost, units: float) -> float:
    return cost.overhead_s + cost.seconds_per_unit * units


def stage_wall(cost: StageCost, units: int, shards: int, slots: int) -> float:
    """Wall seconds of ``shards`` equal jobs over ``units`` on ``slots`` slots (in waves)."""
    return math.ceil(shards / slots) * job_seconds(cost, units / shards)


def stage_work(cost: StageCost, units: int, shards: int) -> float:
    """Job seconds summed over the ``shards`` jobs."""
    return shards * cost.overhead_s + cost.seconds_per_unit * units


def best_shards(parts: Sequence[tuple], max_shards: int) -> int:
    """Shards minimising the summed wall of ``parts`` = [(cost, units, slots)] (ties: fewest)."""
    best, best_wall = 1, math.inf
    for s in range(1, max(1, max_shards) + 1):
        wall = sum(stage_wall(c, u, s, k) for c, u, k in parts)
        if wall < best_wall - 1e-9:
            best, best_wall = s, wall
    return best


def project(
    costs: Mapping[str, StageCost],
    cfg: Mapping[str, Any],
    n_train: int,
    n_eval: int,
    gpus: int,
    cpu_jobs: int,
    rules: Mapping[str, RuleInfo],
    gpu_costs: Optional[Mapping[str, StageCost]] = None,
    gpu_speedup: float = 10.0,
    cores: int = 2,
) -> Dict[str, Any]:
    """Rows (one per measured stage, workflow order), suggested shards per key, totals."""
    gpu_costs = gpu_costs or {}
    plan = []  # (rule, cost, units, slots, device, source)
    for rule in STAGES:
        if rule not in costs:
            continue
        info = rules.get(rule, RuleInfo(1, False))
        cost = costs[rule]
        if info.gpu:
            if rule in gpu_costs:
                cost, source = gpu_costs[rule], "GPU measured"
            else:
                cost = dataclasses.replace(cost, seconds_per_unit=cost.seconds_per_unit / gpu_speedup)
                source = f"CPU / {gpu_speedup:g} (assumed)"
            plan.append((rule, cost, stage_units(rule, cfg, n_train, n_eval), max(1, gpus), "GPU", source))
        else:
            plan.append((rule, cost, stage_units(rule, cfg, n_train, n_eval), max(1, cpu_jobs), "CPU", "CPU measured"))
    shards: Dict[str, int] = {}
    for key in sorted({STAGES[p[0]][1] for p in plan} - {None}):
        parts = [(c, u, k) for r, c, u, k, _, _ in plan if STAGES[r][1] == key]
        cap = min(min(u for _, u, _ in parts), 4 * max(k for _, _, k in parts))
        shards[key] = best_shards(parts, cap)
    rows = []
    for rule, cost, units, slots, device, source in plan:
        key = STAGES[rule][1]
        s = shards[key] if key else 1
        work = stage_work(cost, units, s)
        threads = min(rules.get(rule, RuleInfo(1, False)).threads, cores)
        hours = work / 3600 * (1 if device == "GPU" else threads)
        rows.append(
            Row(
                rule,
                device,
                cost.unit,
                units,
                cost.seconds_per_unit,
                cost.overhead_s,
                hours,
                stage_wall(cost, units, s, slots if key else 1) / 3600,
                key,
                s,
                source,
            )
        )
    return {
        "rows": rows,
        "shards": shards,
        "gpu_h": sum(r.hours for r in rows if r.device == "GPU"),
        "core_h": sum(r.hours for r in rows if r.device == "CPU"),
        "wall_h": sum(r.wall_h for r in rows),
        "assumed_speedup": any("assumed" in r.source for r in rows),
    }


def format_table(result: Mapping[str, Any], markdown: bool = False) -> str:
    head = ["stage", "device", "unit", "units", "s / unit", "overhead s", "total", "wall h", "shards"]
    lines = []
    for r in result["rows"]:
        total = f"{r.hours:,.2f} {'GPU-h' if r.device == 'GPU' else 'core-h'}"
        sh = f"{r.key}.shards = {r.shards}" if r.key else "1 job"
        lines.append(
            [
                r.rule,
                r.device,
                r.unit,
                f"{r.units:,}",
                f"{r.seconds_per_unit:.4g}",
                f"{r.overhead_s:.3g}",
                total,
                f"{r.wall_h:,.2f}",
                sh,
            ]
        )
    lines.append(
        [
            "**total**" if markdown else "total",
            "",
            "",
            "",
            "",
            "",
            f"{result['gpu_h']:,.1f} GPU-h + {result['core_h']:,.1f} core-h",
            f"{result['wall_h']:,.1f}",
            "",
        ]
    )
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
        out += ["| " + " | ".join(x) + " |" for x in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines])


def load_config(configfiles: Sequence[Path], experiment: Optional[str] = None) -> Dict[str, Any]:
    """The validated config (files merged in order, as Snakemake does) of ``experiment`` (default: the first)."""
    import yaml

    sys.path.insert(0, str(REPO))
    from wsss.config import deep_merge, experiment_config, validate_config

    raw: Dict[str, Any] = {}
    for f in configfiles:
        raw = deep_merge(raw, yaml.safe_load(Path(f).read_text()) or {})
    cfg = validate_config(raw)
    name = experiment or sorted(cfg["experiments"])[0]
    return experiment_config(cfg, name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--figures", type=Path, default=REPO / "bench" / "figures" / "voc_scale_cpu.json")
    ap.add_argument("--gpu-figures", type=Path, default=None, help="per-stage GPU figures (JSON)")
    ap.add_argument("--gpu-speedup", type=float, default=10.0, help="assumed CPU->GPU speed-up without GPU figures")
    ap.add_argument("--gpus", type=int, default=4, help="GPU slots")
    ap.add_argument("--cpu-jobs", type=int, default=64, help="CPU job slots")
    ap.add_argument("--configfile", type=Path, nargs="+", default=[REPO / "config.yaml"])
    ap.add_argument("--experiment", default=None)
    ap.add_argument("--dataset", choices=["voc", "coco", "both"], default="both")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    figures = json.loads(a.figures.read_text())
    costs = fit_costs(figures)
    gpu_figs = json.loads(a.gpu_figures.read_text()) if a.gpu_figures else None
    gpu_costs = fit_costs(gpu_figs) if gpu_figs else {}
    cfg = load_config(a.configfile, a.experiment)
    rules = rule_info()
    cores = rehearsal_cores(figures)
    print(
        f"per-unit costs: {a.figures} ({figures.get('machine', '?')}, {figures.get('date', '?')}; "
        f"core-h with at most {cores} threads per job)"
    )
    if gpu_figs:
        print(f"GPU figures: {a.gpu_figures} ({gpu_figs.get('device', '?')}); other GPU stages as below")
    epochs = (cfg["classifier"]["epochs"], cfg["irn"]["train"]["epochs"], cfg["deeplab"]["epochs"])
    print(
        f"config: {', '.join(map(str, a.configfile))}; epochs classifier {epochs[0]}, IRN {epochs[1]}, DeepLab {epochs[2]}"
    )
    print(f"slots: {a.gpus} GPUs, {a.cpu_jobs} CPU jobs")
    missing = [r for r in STAGES if r not in costs]
    if missing:
        print(f"not measured (left out): {', '.join(missing)}")
    for ds in ["voc", "coco"] if a.dataset == "both" else [a.dataset]:
        title, n_train, n_eval = DATASETS[ds]
        res = project(costs, cfg, n_train, n_eval, a.gpus, a.cpu_jobs, rules, gpu_costs, a.gpu_speedup, cores)
        print(f"\n{'### ' if a.markdown else ''}{title}: {n_train:,} + {n_eval:,} images\n")
        print(format_table(res, a.markdown))
        if res["assumed_speedup"]:
            print(
                f"\nASSUMPTION: GPU stages without GPU figures run {a.gpu_speedup:g}x faster per unit than "
                "on the rehearsal CPU (--gpu-speedup); their per-job overhead is kept."
            )
        print("suggested shards: " + ", ".join(f"{k}.shards: {v}" for k, v in res["shards"].items()))
        print(f"total wall (stages in sequence, an upper bound): {res['wall_h']:,.1f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
