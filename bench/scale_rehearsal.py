"""Scale rehearsal: what the workflow costs at PASCAL VOC's size, measured on this machine.

Three measurements (each can be skipped):

1. **DAG build time** - ``snakemake -n`` (wall time and peak memory of the Snakemake process) for
   the default config on the ``voc_scale`` synthetic preset (VOC's 10,582 / 1,464 / 1,449 images)
   with ``cam.shards`` 1, 16 and 64, and for ``configs/ablations.yaml`` (the ablation grid).
   Target: the ablation dry run under 10 s.
2. **Per-image cost of every stage** - the real DAG on a subset of ``voc_scale`` (~500 x 375
   images; ``--sizes`` images in train_aug, half as many in val; one epoch per training stage),
   read from Snakemake's per-job benchmark files: seconds per image (per image and epoch for the
   training stages), peak memory per job, and the HDF5 CAM store's bytes per image. Run with two
   sizes, it flags stages whose per-image cost grows with the dataset size.
3. The figures go to ``--out`` (JSON; default ``bench/figures/voc_scale_cpu.json``), the input
   of a cost model (projected hours per stage for VOC and COCO).

Usage::

    python bench/scale_rehearsal.py                       # everything (~15-30 min on 2 cores)
    python bench/scale_rehearsal.py --skip-stages         # only the dry runs (~2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

#: Snakemake rule -> (what one unit of work is, how to count units from the rehearsal's sizes)
UNITS = {
    "train_classifier": "image-epoch",
    "cam_shard": "image",
    "seed_eval": "image",
    "crf_shard": "image",
    "ir_labels_shard": "image",
    "train_irn": "image-epoch",
    "irn_masks_shard": "image",
    "seed_masks_shard": "image",
    "train_deeplab": "image-epoch",
    "deeplab_predict_shard": "image",
}


def run_measured(cmd, cwd) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB of the child, output) of ``cmd``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out


def snakemake_cmd(workdir: Path, configfiles, *args) -> list:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        *map(str, configfiles),
        *args,
    ]


def job_total(output: str) -> int:
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "total" and parts[1].isdigit():
            return int(parts[1])
    return 0


def dag_build(tmp: Path) -> list:
    rows = []
    for shards in (1, 16, 64):
        extra = tmp / f"shards{shards}.yaml"
        extra.write_text(
            yaml.safe_dump(
                {
                    "synthetic": {"preset": "voc_scale"},
                    "cam": {"shards": shards},
                    "crf": {"shards": shards},
                    "irn": {"shards": shards},
                    "deeplab": {"shards": shards},
                }
            )
        )
        wall, rss, out = run_measured(
            snakemake_cmd(tmp / f"w{shards}", [REPO / "config.yaml", extra], "-n", "--quiet", "rules"), REPO
        )
        rows.append(
            {
                "config": f"default, voc_scale, shards {shards}",
                "jobs": job_total(out),
                "seconds": round(wall, 2),
                "peak_mib": round(rss),
            }
        )
        print(
            f"  dry run, default config, voc_scale, {shards:>2} shards per stage: {wall:6.1f} s, {rss:6.0f} MiB, {rows[-1]['jobs']} jobs",
            flush=True,
        )
    wall, rss, out = run_measured(
        snakemake_cmd(
            tmp / "wab", [REPO / "config.yaml", REPO / "configs" / "ablations.yaml"], "-n", "--quiet", "rules"
        ),
        REPO,
    )
    rows.append(
        {"config": "configs/ablations.yaml", "jobs": job_total(out), "seconds": round(wall, 2), "peak_mib": round(rss)}
    )
    print(
        f"  dry run, configs/ablations.yaml: {wall:6.1f} s, {rss:6.0f} MiB, {rows[-1]['jobs']} jobs (target < 10 s)",
        flush=True,
    )
    return rows


def read_benchmarks(run_dir: Path) -> dict:
    """rule -> (summed seconds over its jobs, max peak RSS MiB) from Snakemake's benchmark TSVs."""
    out: dict = {}
    for f in run_dir.glob("**/benchmarks/*.tsv"):
        rule = f.stem.split("-")[0]
        lines = f.read_text().splitlines()
        head, last = lines[0].split("\t"), lines[-1].split("\t")
        row = dict(zip(head, last))
        s, rss = float(row["s"]), float(row["max_rss"]) if row.get("max_rss", "NA") not in ("NA", "-") else float("nan")
        t, m = out.get(rule, (0.0, 0.0))
        out[rule] = (t + s, max(m, rss))
    return out


def stage_costs(tmp: Path, n: int, threads: int) -> dict:
    """Per-unit cost of each stage on ``n`` train_aug + n // 2 val images of voc_scale."""
    n_val = max(2, n // 2)
    cfg = {
        "synthetic": {
            "preset": "voc_scale",
            "overrides": {"n_train_aug": n, "n_train": max(2, n // 2), "n_val": n_val},
        },
        # batches of 4: the smallest rehearsal must give full batches (the per-image cost of a
        # CPU training step hardly depends on the batch size)
        "classifier": {"epochs": 1, "batch_size": 4},
        "cam": {"shards": 1},
        "crf": {"shards": 1},
        "irn": {"shards": 1, "train": {"epochs": 1, "batch_size": 4, "mean_shift_batch_size": 4}},
        "deeplab": {"epochs": 1, "shards": 1, "batch_size": 4},
    }
    extra = tmp / f"stages{n}.yaml"
    extra.write_text(yaml.safe_dump(cfg))
    work = tmp / f"stages{n}"
    wall, _, _ = run_measured(snakemake_cmd(work, [REPO / "config.yaml", extra], "--cores", str(threads)), REPO)
    bench = read_benchmarks(work / "results" / "synthetic-voc_scale")
    images = {"image": n + n_val, "image-epoch": n}
    images_of = {"seed_eval": n_val, "deeplab_predict_shard": n_val}
    costs = {}
    for rule, unit in UNITS.items():
        if rule not in bench:
            continue
        s, rss = bench[rule]
        units = images_of.get(rule, images[unit])
        costs[rule] = {
            "unit": unit,
            "seconds_per_unit": round(s / units, 4),
            "job_seconds": round(s, 2),
            "units": units,
            "peak_mib": round(rss),
        }
    shard = sorted((work / "results" / "synthetic-voc_scale").glob("**/cams/shard-*.h5"))
    store = sum(p.stat().st_size for p in shard)
    return {
        "images": n,
        "val_images": n_val,
        "wall_seconds": round(wall, 1),
        "stages": costs,
        "cam_store_bytes_per_image": round(store / (n + n_val)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16], help="train_aug images of each stage rehearsal")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--skip-dag", action="store_true")
    ap.add_argument("--skip-stages", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "figures" / "voc_scale_cpu.json")
    a = ap.parse_args(argv)
    figures = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "device": "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }
    with tempfile.TemporaryDirectory(prefix="wsss-scale-") as d:
        tmp = Path(d)
        if not a.skip_dag:
            print("DAG build (snakemake -n):", flush=True)
            figures["dag_build"] = dag_build(tmp)
        if not a.skip_stages:
            figures["rehearsals"] = []
            for n in a.sizes:
                print(f"stages on {n} train_aug + {max(2, n // 2)} val voc_scale images:", flush=True)
                r = stage_costs(tmp, n, a.cores)
                figures["rehearsals"].append(r)
                for rule, c in r["stages"].items():
                    print(
                        f"  {rule:<22} {c['seconds_per_unit']:8.3f} s / {c['unit']:<11} peak {c['peak_mib']:6.0f} MiB",
                        flush=True,
                    )
                print(
                    f"  CAM store: {r['cam_store_bytes_per_image'] / 1e6:.2f} MB per image; wall {r['wall_seconds']} s",
                    flush=True,
                )
            if len(figures["rehearsals"]) > 1:
                small, large = figures["rehearsals"][0]["stages"], figures["rehearsals"][-1]["stages"]
                grows = [
                    r for r in small if r in large and large[r]["seconds_per_unit"] > 1.5 * small[r]["seconds_per_unit"]
                ]
                figures["grows_with_size"] = grows
                print("per-image cost grows with the dataset size:", ", ".join(grows) or "no stage", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.out.exists():  # keep the figures of parts skipped this time
        old = json.loads(a.out.read_text())
        figures = {**old, **figures}
    a.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
