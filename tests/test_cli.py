"""The ``wsss`` command: ``status`` (stale outputs) and ``show`` (one image's panel).

The results tree is written directly in the documented formats with the package's own writers
(CamShardWriter, write_shard_marker, write_label_png, write_metrics_csv, save_checkpoint), for
one run of the tiny preset; no stage is trained.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import wsss
from wsss.cli import EXIT_ERROR, EXIT_OK, EXIT_STALE, config_files, main
from wsss.config import config_hash, run_config
from wsss.status import collect_status, format_table, load_config, read_checkpoint_metadata, summary_line
from wsss.workflow.stages import stage_params

REPO = Path(__file__).resolve().parents[1]
RUN = "baseline/s0"
TAG = "synthetic-tiny"


@pytest.fixture(scope="module")
def cfg_file(tiny_root, tmp_path_factory) -> Path:
    raw = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    raw["dataset"]["root"] = str(tiny_root)
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def cfg(cfg_file):
    """The config snakemake --configfile <cfg_file> would use: the Snakefile's config.yaml, then it."""
    return load_config(config_files([str(cfg_file)]))


def test_config_files_as_snakemake_merges_them(cfg_file, tmp_path, monkeypatch):
    base = str(REPO / "config.yaml")
    assert config_files([str(cfg_file)]) == [base, str(cfg_file)]
    assert config_files([base, str(cfg_file)]) == [base, str(cfg_file)]  # given again: read once
    assert config_files(None) == [base]
    assert config_files([str(cfg_file)], no_config=True) is None
    monkeypatch.chdir(tmp_path)  # elsewhere: the checkout this package is installed from
    assert config_files(None) == [base]


def _present_keys(gt: np.ndarray) -> np.ndarray:
    classes = np.unique(gt)
    return np.array([c - 1 for c in classes if c not in (0, 255)], np.int64)


def build_results(root: Path, cfg, n_images: int = 3) -> dict:
    """A results tree of one run as the workflow writes it: CAM shard, threshold sweep, seed / CRF /
    IRN masks with their shard markers, mask metrics, a classifier model file, DeepLab metrics and
    the summary table. Returns paths and ids."""
    import torch

    from wsss.cams import CamShardWriter
    from wsss.data import open_dataset
    from wsss.engine import save_checkpoint
    from wsss.io import voc_palette, write_label_png
    from wsss.metrics import write_metrics_csv
    from wsss.seeds import cam_to_label, write_table
    from wsss.workflow.markers import masks_dir, write_shard_marker

    results = root / "results"
    run_dir = results / TAG / RUN
    rc = run_config(cfg, RUN)
    ds = open_dataset(rc)
    ids = ds.ids("val")[:n_images]
    rng = np.random.default_rng(0)
    pal = voc_palette()

    cam_params = stage_params(rc, "cam")
    maps = {}
    with CamShardWriter(
        run_dir / "cams" / "shard-1-of-1.h5",
        config=cam_params,
        scales=[1.0, 0.5],
        normalisation="max",
        num_classes=ds.num_fg_classes,
    ) as w:
        for i in ids:
            gt = ds.load_mask(i)
            keys = _present_keys(gt)
            h, wd = gt.shape
            high = rng.random((len(keys), h, wd)).astype(np.float32)
            cam = rng.random((len(keys), math.ceil(h / 4), math.ceil(wd / 4))).astype(np.float32)
            w.add(i, keys, cam, high)
            maps[i] = (keys, high)

    sweep = pd.DataFrame(
        {
            "threshold": [0.1, 0.2],
            "split": "val",
            "miou": [0.2, 0.3],
            "chosen_with_gt": [False, True],
            "package_version": wsss.__version__,
            "config_hash": config_hash(cam_params),
        }
    )
    write_table(sweep, run_dir / "seeds" / "threshold_sweep.csv")

    def masks(folder: str, kind: str, resolved: dict, label_of) -> Path:
        base = run_dir / folder
        out = masks_dir(base, resolved)
        for i in ids:
            write_label_png(out / f"{i}.png", label_of(i), pal)
        write_shard_marker(base / "shard-1-of-1.json", kind=kind, ids=ids, mask_dir=out, resolved=resolved)
        return out

    seed_resolved = dict(stage_params(rc, "seed_masks"), seed_threshold=0.2)
    masks("seeds/masks", "seeds", seed_resolved, lambda i: cam_to_label(maps[i][1], maps[i][0], 0.2))
    crf_dir = masks("crf", "crf", stage_params(rc, "crf"), ds.load_mask)
    masks("irn/masks", "irn", stage_params(rc, "irn_infer"), ds.load_mask)
    write_metrics_csv(
        run_dir / "crf" / "metrics.csv",
        {"kind": "crf", "split": "val", "miou": 0.3, "package_version": wsss.__version__, "mask_dir": str(crf_dir)},
    )

    clf = stage_params(rc, "classifier")
    save_checkpoint(
        run_dir / "classifier" / "model.pt",
        model={"w": torch.zeros(3)},
        method="cam",
        config=clf,
        config_hash=config_hash(clf),
    )
    write_metrics_csv(
        run_dir / "deeplab" / "metrics.csv",
        {
            "split": "val",
            "package_version": wsss.__version__,
            "config_hash": config_hash(stage_params(rc, "deeplab_eval")),
            "miou": 0.25,
        },
    )
    (results / TAG / "tables").mkdir(parents=True)
    pd.DataFrame({"run": [RUN], "seed_miou": [0.3], "package_version": [wsss.__version__]}).to_csv(
        results / TAG / "tables" / "summary.csv", index=False
    )
    # not outputs: a resume checkpoint, a journal, a benchmark, a log
    (run_dir / "classifier" / "work").mkdir()
    (run_dir / "classifier" / "work" / "last.pt").write_bytes(b"not read")
    (run_dir / "crf" / "shard-1-of-1.json.journal").write_text("{}\n")
    (run_dir / "benchmarks").mkdir()
    (run_dir / "benchmarks" / "crf_shard-1-of-1.tsv").write_text("s\n1\n")
    (results / "logs").mkdir()
    (results / "logs" / "x.log").write_text("log")
    return {"results": results, "run_dir": run_dir, "ids": ids, "ds": ds, "keys": {i: maps[i][0] for i in ids}}


@pytest.fixture
def tree(tmp_path, cfg):
    return build_results(tmp_path, cfg)


def by_rel(statuses, results):
    return {str(s.path.relative_to(results)): s for s in statuses}


# ----------------------------------------------------------------------------------------------
# status


def test_status_all_current(tree, cfg, cfg_file, capsys):
    results = tree["results"]
    st = by_rel(collect_status(results, cfg), results)
    run = f"{TAG}/{RUN}"
    assert set(st) == {
        f"{run}/cams/shard-1-of-1.h5",
        f"{run}/seeds/threshold_sweep.csv",
        f"{run}/seeds/masks/shard-1-of-1.json",
        f"{run}/crf/shard-1-of-1.json",
        f"{run}/crf/metrics.csv",
        f"{run}/irn/masks/shard-1-of-1.json",
        f"{run}/classifier/model.pt",
        f"{run}/deeplab/metrics.csv",
        f"{TAG}/tables/summary.csv",
    }
    assert not any(s.stale for s in st.values()), format_table(list(st.values()))
    for rel, s in st.items():
        assert s.version == wsss.__version__
        assert s.config_match == ("unknown" if rel.endswith("summary.csv") else "yes"), rel
    assert st[f"{run}/cams/shard-1-of-1.h5"].rule == "cam_shard"
    assert st[f"{run}/seeds/masks/shard-1-of-1.json"].rule == "seed_masks_shard"
    assert st[f"{run}/classifier/model.pt"].rule == "train_classifier"

    assert main(["status", "--results", str(results), "--configfile", str(cfg_file)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "cams/shard-1-of-1.h5" in out and "cam_shard" in out and "stale" not in out
    assert "9 output(s), all made by wsss" in out


def test_status_and_show_know_affinitynet(tree, cfg):
    """AffinityNet's model file, shard markers and mask evaluation are checked against their stages
    (affinitynet_train, affinity_labels, affinitynet_infer); its masks are a ``wsss show`` panel."""
    import torch

    from wsss.engine import save_checkpoint
    from wsss.io import voc_palette, write_label_png
    from wsss.metrics import write_metrics_csv
    from wsss.show import image_panels
    from wsss.workflow.markers import masks_dir, write_shard_marker

    results, run_dir, ids, ds = tree["results"], tree["run_dir"], tree["ids"], tree["ds"]
    rc = run_config(cfg, RUN)
    train = stage_params(rc, "affinitynet_train")
    save_checkpoint(
        run_dir / "affinitynet" / "model.pt",
        model={"w": torch.zeros(3)},
        method="affinitynet",
        config=train,
        config_hash=config_hash(train),
    )
    for folder, kind, stage in (
        ("labels", "affinity_labels", "affinity_labels"),
        ("masks", "affinitynet", "affinitynet_infer"),
    ):
        resolved = stage_params(rc, stage)
        out = masks_dir(run_dir / "affinitynet" / folder, resolved)
        for i in ids:
            write_label_png(out / f"{i}.png", ds.load_mask(i), voc_palette())
        write_shard_marker(
            run_dir / "affinitynet" / folder / "shard-1-of-1.json", kind=kind, ids=ids, mask_dir=out, resolved=resolved
        )
    write_metrics_csv(
        run_dir / "affinitynet" / "masks" / "metrics.csv",
        {"kind": "affinitynet", "split": "val", "miou": 0.3, "package_version": wsss.__version__, "mask_dir": str(out)},
    )
    st = by_rel(collect_status(results, cfg), results)
    run = f"{TAG}/{RUN}/affinitynet"
    rules = {
        rel: st[f"{run}/{rel}"].rule
        for rel in ("model.pt", "labels/shard-1-of-1.json", "masks/shard-1-of-1.json", "masks/metrics.csv")
    }
    assert rules == {
        "model.pt": "train_affinitynet",
        "labels/shard-1-of-1.json": "affinity_labels_shard",
        "masks/shard-1-of-1.json": "affinitynet_masks_shard",
        "masks/metrics.csv": "eval_masks",
    }, rules
    assert all(st[f"{run}/{rel}"].config_match == "yes" and not st[f"{run}/{rel}"].stale for rel in rules), (
        format_table(list(st.values()))
    )
    assert "AffinityNet" in image_panels(ds, run_dir, ids[0]).titles


def test_status_version_change_is_stale(tree, cfg, cfg_file, capsys):
    results, run_dir = tree["results"], tree["run_dir"]
    marker = run_dir / "crf" / "shard-1-of-1.json"
    m = json.loads(marker.read_text())
    m["package_version"] = "0.0.1"
    marker.write_text(json.dumps(m))

    st = by_rel(collect_status(results, cfg), results)
    stale = [rel for rel, s in st.items() if s.stale]
    assert stale == [f"{TAG}/{RUN}/crf/shard-1-of-1.json"]
    assert st[stale[0]].version == "0.0.1" and st[stale[0]].config_match == "yes"

    assert main(["status", "--results", str(results), "--configfile", str(cfg_file)]) == EXIT_STALE
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "crf/shard-1-of-1.json" in ln)
    assert "0.0.1" in line and wsss.__version__ in line and "stale" in line and "crf_shard" in line
    assert "1 of 9 output(s) stale" in out and "--forcerun crf_shard" in out
    # --stale-only lists just that one
    assert main(["status", "--results", str(results), "--configfile", str(cfg_file), "--stale-only"]) == EXIT_STALE
    out = capsys.readouterr().out
    assert "crf/shard-1-of-1.json" in out and "cams/shard" not in out


def test_status_checkpoint_version_read_without_weights(tree, cfg):
    import torch

    results, run_dir = tree["results"], tree["run_dir"]
    path = run_dir / "classifier" / "model.pt"
    state = torch.load(path, weights_only=True)
    meta = read_checkpoint_metadata(path)
    assert meta["package_version"] == wsss.__version__ and meta["config_hash"] == state["config_hash"]
    assert "model" not in meta  # tensors are never materialised
    state["package_version"] = "0.0.9"
    torch.save(state, path)
    st = by_rel(collect_status(results, cfg), results)
    s = st[f"{TAG}/{RUN}/classifier/model.pt"]
    assert s.stale and s.version == "0.0.9" and s.config_match == "yes"


def test_status_config_change(tree, cfg_file, tmp_path, capsys):
    """Another cam setting in a second config file: the CAM shard and the sweep of its CAMs no longer
    match; the CRF masks, whose own params did not change, still do (Snakemake reruns them through
    their inputs)."""
    results = tree["results"]
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({"cam": {"scales": [1.0]}}))
    cfg2 = load_config(config_files([str(cfg_file), str(over)]))
    st = by_rel(collect_status(results, cfg2), results)
    run = f"{TAG}/{RUN}"
    assert st[f"{run}/cams/shard-1-of-1.h5"].config_match == "no"
    assert st[f"{run}/seeds/threshold_sweep.csv"].config_match == "no"
    assert st[f"{run}/crf/shard-1-of-1.json"].config_match == "yes"
    assert st[f"{run}/crf/metrics.csv"].config_match == "yes"
    assert {rel for rel, s in st.items() if s.stale} == {
        f"{run}/cams/shard-1-of-1.h5",
        f"{run}/seeds/threshold_sweep.csv",
    }
    assert main(["status", "--results", str(results), "--configfile", str(cfg_file), str(over)]) == EXIT_STALE
    assert "--forcerun cam_shard seed_eval" in capsys.readouterr().out


def test_status_without_config_and_foreign_runs(tree, cfg, capsys):
    results = tree["results"]
    # versions only: the config column is unknown, nothing is stale
    st = collect_status(results, None)
    assert {s.config_match for s in st} == {"unknown"} and not any(s.stale for s in st)
    assert main(["status", "--results", str(results), "--no-config"]) == EXIT_OK
    assert "config match is unknown" in capsys.readouterr().out
    # a run the config does not have: compared by version only
    other = results / TAG / "other" / "s3"
    other.mkdir(parents=True)
    (tree["run_dir"] / "crf" / "metrics.csv").rename(other / "metrics.csv")
    s = by_rel(collect_status(results, cfg), results)[f"{TAG}/other/s3/metrics.csv"]
    assert s.config_match == "unknown" and not s.stale and "not a run of the config" in s.note


def test_status_unreadable_and_missing(tree, cfg, tmp_path, capsys):
    results, run_dir = tree["results"], tree["run_dir"]
    (run_dir / "irn" / "masks" / "shard-1-of-1.json").write_text('{"kind": "irn", ')  # cut
    st = by_rel(collect_status(results, cfg), results)
    s = st[f"{TAG}/{RUN}/irn/masks/shard-1-of-1.json"]
    assert s.stale and s.version is None and s.note.startswith("unreadable")
    assert summary_line(list(st.values())).startswith("1 of 9 output(s) stale")

    assert main(["status", "--results", str(tmp_path / "nowhere"), "--no-config"]) == EXIT_ERROR
    assert "results folder not found" in capsys.readouterr().err
    assert main(["status", "--results", str(results), "--configfile", str(tmp_path / "missing.yaml")]) == EXIT_ERROR
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("classifier: {epochs: many}\n")
    assert main(["status", "--results", str(results), "--configfile", str(bad)]) == EXIT_ERROR
    assert "classifier.epochs" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# show


def test_show_writes_panels(tree, tmp_path):
    """One panel per output; the CAM panel is the maximum over the present classes (one class: that
    class's map, titled with its name), or with per_class one panel per class."""
    from wsss.show import write_image_panel

    names = tree["ds"].class_names
    by_k = {len(tree["keys"][i]): i for i in tree["ids"]}
    assert 1 in by_k and max(by_k) >= 2, by_k  # the tiny val images have one and several classes
    for k, image_id in sorted(by_k.items()):
        keys = tree["keys"][image_id]
        out = tmp_path / f"panel-{k}.png"
        panels = write_image_panel(tree["ds"], tree["run_dir"], image_id, out, tile=64)
        cam_title = f"CAM (max of {k})" if k > 1 else f"CAM {names[int(keys[0]) + 1]}"
        assert panels.titles == ["image", "ground truth", cam_title, "seeds", "CRF", "IRN"]
        with Image.open(out) as im:
            assert im.format == "PNG" and im.width == 6 * (64 + 4) + 4

        per_class = write_image_panel(tree["ds"], tree["run_dir"], image_id, out, per_class=True, tile=64)
        assert per_class.titles[2 : 2 + k] == [f"CAM {names[int(c) + 1]}" for c in keys]
        with Image.open(out) as im:
            assert im.width == (5 + k) * (64 + 4) + 4
    assert not list(tmp_path.glob(".tmp-*"))


def test_show_panels_only_where_outputs_exist(tree, tmp_path):
    """Without seed masks the seeds come from the CAM and the chosen threshold; without CAMs,
    neither CAM nor computed seeds; IRN gone: no IRN panel."""
    import shutil

    from wsss.show import image_panels

    run_dir, image_id = tree["run_dir"], tree["ids"][1]
    shutil.rmtree(run_dir / "seeds" / "masks")
    shutil.rmtree(run_dir / "irn")
    p = image_panels(tree["ds"], run_dir, image_id)
    assert p.titles[3:] == ["seeds (t=0.2)", "CRF"]
    shutil.rmtree(run_dir / "cams")
    assert image_panels(tree["ds"], run_dir, image_id).titles == ["image", "ground truth", "CRF"]


def test_show_damaged_marker_is_a_note(tree):
    from wsss.show import image_panels

    run_dir, image_id = tree["run_dir"], tree["ids"][0]
    (run_dir / "crf" / "shard-1-of-1.json").write_text('{"kind": "crf", ')  # cut
    p = image_panels(tree["ds"], run_dir, image_id)
    assert "CRF" not in p.titles and "IRN" in p.titles
    assert any("unreadable: shard-1-of-1.json" in n for n in p.notes), p.notes


def test_show_cli(tree, cfg_file, tmp_path, capsys):
    image_id = tree["ids"][0]
    out = tmp_path / "p.png"
    rc = main(
        [
            "show",
            image_id,
            "--results",
            str(tree["results"]),
            "--experiment",
            RUN,
            "--out",
            str(out),
            "--configfile",
            str(cfg_file),
            "--tile",
            "48",
        ]
    )
    assert rc == EXIT_OK, capsys.readouterr()
    assert out.exists() and "image, ground truth, CAM" in capsys.readouterr().out
    # no config: the dataset tag and run are the only ones there, the images found from the config
    # the outputs record
    out2 = tmp_path / "q.png"
    assert main(["show", image_id, "--results", str(tree["results"]), "--out", str(out2), "--no-config"]) == EXIT_OK
    with Image.open(out) as a, Image.open(out2) as b:
        assert b.width == 6 * (256 + 4) + 4 and a.width == 6 * (48 + 4) + 4
    # the default config's dataset (synthetic) has no results here: the only dataset folder is shown
    out3 = tmp_path / "r.png"
    assert main(["show", image_id, "--results", str(tree["results"]), "--out", str(out3)]) == EXIT_OK
    assert out3.exists()


def test_show_unknown_image_id(tree, cfg_file, tmp_path, capsys):
    out = tmp_path / "p.png"
    rc = main(
        [
            "show",
            "no_such_image",
            "--results",
            str(tree["results"]),
            "--experiment",
            RUN,
            "--out",
            str(out),
            "--configfile",
            str(cfg_file),
        ]
    )
    assert rc == EXIT_ERROR and not out.exists()
    err = capsys.readouterr().err
    assert "unknown image id 'no_such_image'" in err and err.startswith("wsss show: error:")
    # and an unknown run names the runs there
    rc = main(
        [
            "show",
            tree["ids"][0],
            "--results",
            str(tree["results"]),
            "--experiment",
            "nope/s0",
            "--out",
            str(out),
            "--configfile",
            str(cfg_file),
        ]
    )
    assert rc == EXIT_ERROR and "baseline/s0" in capsys.readouterr().err


def test_show_unknown_image_id_console_script(tree, cfg_file, tmp_path):
    exe = Path(sys.executable).with_name("wsss")
    r = subprocess.run(
        [
            str(exe),
            "show",
            "no_such_image",
            "--results",
            str(tree["results"]),
            "--experiment",
            RUN,
            "--out",
            str(tmp_path / "p.png"),
            "--configfile",
            str(cfg_file),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == EXIT_ERROR and "no_such_image" in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------
# entry points


@pytest.mark.parametrize(
    "cmd",
    [["wsss", "--help"], ["-m", "wsss", "--help"], ["wsss", "status", "--help"], ["-m", "wsss", "show", "--help"]],
)
def test_entry_points_help(cmd):
    if cmd[0] == "wsss":
        exe = Path(sys.executable).with_name("wsss")
        assert exe.exists(), f"{exe} missing: the console script is installed by `pip install -e .`"
        argv = [str(exe), *cmd[1:]]
    else:
        argv = [sys.executable, *cmd]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "usage: wsss" in r.stdout


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and wsss.__version__ in capsys.readouterr().out
