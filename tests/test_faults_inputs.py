"""Damaged input tables never become a silent wrong result: labels CSVs with values other than 0/1,
and cut or incomplete metrics / threshold-sweep / benchmark files, raise DataError naming the file."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from wsss.csvio import read_csv_checked
from wsss.data.base import read_labels_csv, write_labels_csv
from wsss.io import DataError
from wsss.seeds import chosen_threshold, read_sweep, sweep_chosen_row
from wsss.tables import experiment_row, stage_times, summary_table

CLASSES = ["background", "cat", "dog", "bird"]
HEADER = "image_id,cat,dog,bird\n"


# ---------------------------------------------------------------------------------------------
# A. labels CSV
# ---------------------------------------------------------------------------------------------


def _labels(tmp_path, body, header=HEADER):
    p = tmp_path / "labels.csv"
    p.write_text(header + body)
    return p


def test_valid_labels_are_unchanged_float32(tmp_path):
    ids = ["007", "2008_000123", "x"]
    labels = {
        "007": np.array([1, 0, 1], np.float32),
        "2008_000123": np.array([0, 0, 0], np.float32),
        "x": np.array([1, 1, 1], np.float32),
    }
    write_labels_csv(tmp_path / "labels.csv", ids, labels, CLASSES)
    got = read_labels_csv(tmp_path / "labels.csv", CLASSES)
    assert list(got) == ids  # file order, ids kept as strings ("007" stays "007")
    for i in ids:
        assert got[i].dtype == np.float32 and got[i].tobytes() == labels[i].tobytes()
    # integer-valued floats are fine, and give the same bytes
    p = _labels(tmp_path, "a,1.0,0.0,1\nb,0,1,0.0\n")
    got = read_labels_csv(p, CLASSES)
    assert got["a"].tobytes() == np.array([1, 0, 1], np.float32).tobytes()
    assert got["b"].tobytes() == np.array([0, 1, 0], np.float32).tobytes()
    # "-0" is 0.0, not -0.0
    assert (
        read_labels_csv(_labels(tmp_path, "a,-0,-0.0,1\n"), CLASSES)["a"].tobytes()
        == np.array([0, 0, 1], np.float32).tobytes()
    )
    # no final newline: still fine for a label file (every value is whole)
    assert read_labels_csv(_labels(tmp_path, "a,1,0,1"), CLASSES)["a"].tolist() == [1, 0, 1]


@pytest.mark.parametrize("cell", ["2", "-1", "0.5", "nan", "NaN", "inf", "yes", "True"])
def test_labels_value_other_than_0_or_1(tmp_path, cell):
    p = _labels(tmp_path, f"a,1,0,0\nb,0,{cell},1\n")
    with pytest.raises(DataError) as e:
        read_labels_csv(p, CLASSES)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "image b" in msg and "'dog'" in msg and cell in msg


@pytest.mark.parametrize("body", ["a,1,,0\n", "a,1, ,0\n"])
def test_labels_empty_cell(tmp_path, body):
    p = _labels(tmp_path, "z,0,0,0\n" + body)
    with pytest.raises(DataError, match=re.escape(str(p)) + r", line 3 \(image a\), column 'dog': an empty cell"):
        read_labels_csv(p, CLASSES)


def test_labels_truncated_row(tmp_path):
    p = _labels(tmp_path, "a,1,0,0\nb,0,1\n")  # cut mid-row: bird missing
    with pytest.raises(DataError) as e:
        read_labels_csv(p, CLASSES)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "image b" in msg and "['bird']" in msg
    with pytest.raises(DataError, match=r"line 2 \(image a\).*\['cat', 'dog', 'bird'\]"):
        read_labels_csv(_labels(tmp_path, "a\n"), CLASSES)
    with pytest.raises(DataError, match=r"line 2 \(image a\) has 5 fields"):
        read_labels_csv(_labels(tmp_path, "a,1,0,0,1\n"), CLASSES)


def test_labels_duplicate_image_id(tmp_path):
    p = _labels(tmp_path, "a,1,0,0\nb,0,1,0\na,1,0,0\n")
    with pytest.raises(DataError, match=re.escape(str(p)) + r", line 4 \(image a\).*also on line 2"):
        read_labels_csv(p, CLASSES)


def test_labels_empty_or_header_only_or_no_id(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        read_labels_csv(_labels(tmp_path, "", header=""), CLASSES)
    with pytest.raises(DataError, match="header but no rows"):
        read_labels_csv(_labels(tmp_path, ""), CLASSES)
    with pytest.raises(DataError, match=r"line 2: empty image_id"):
        read_labels_csv(_labels(tmp_path, ",1,0,0\n"), CLASSES)
    with pytest.raises(DataError, match="has columns"):
        read_labels_csv(_labels(tmp_path, "a,1,0\n", header="image_id,cat,dog\n"), CLASSES)


def test_coco_split_labels_go_through_the_checked_reader(tmp_path):
    from wsss.data.coco import COCO_CLASSES, COCODataset

    root = tmp_path / "coco"
    (root / "lists").mkdir(parents=True)
    (root / "lists" / "val.txt").write_text("42\n")
    fg = COCO_CLASSES[1:]
    (root / "lists" / "val_labels.csv").write_text(
        "image_id," + ",".join(fg) + "\n42," + ",".join(["0"] * (len(fg) - 1) + ["3"]) + "\n"
    )
    ds = COCODataset(root)
    with pytest.raises(DataError, match=r"val_labels.csv, line 2 \(image 42\), column '" + fg[-1] + "'"):
        ds.labels("42")


def test_voc_labels_csv_goes_through_the_checked_reader(tiny_root, tmp_path):
    from wsss.data.voc import VOCDataset

    names = VOCDataset(tiny_root).class_names
    p = tmp_path / "labels.csv"
    p.write_text("image_id," + ",".join(names[1:]) + "\nimg," + ",".join(["0.5"] * (len(names) - 1)) + "\n")
    with pytest.raises(DataError, match=re.escape(str(p)) + r", line 2 \(image img\), column '" + names[1] + "'"):
        VOCDataset(tiny_root, labels_csv=p)


# ---------------------------------------------------------------------------------------------
# B. tables written by one stage and read by another
# ---------------------------------------------------------------------------------------------


def test_read_csv_checked_faults(tmp_path):
    p = tmp_path / "metrics.csv"
    with pytest.raises(DataError, match="not found"):
        read_csv_checked(p, ["miou"])
    p.write_text("")
    with pytest.raises(DataError, match=re.escape(str(p)) + " is empty"):
        read_csv_checked(p, ["miou"])
    p.write_text("miou,JF\n")
    with pytest.raises(DataError, match=re.escape(str(p)) + " has a header but no data rows"):
        read_csv_checked(p, ["miou"])
    p.write_text("miou,JF\n0.5")  # cut mid-line
    with pytest.raises(DataError, match=re.escape(str(p)) + " ends mid-line"):
        read_csv_checked(p, ["miou"])
    p.write_text("split,miou,JF\nval,0.5\n")  # cut mid-row, at a field boundary
    with pytest.raises(DataError, match=re.escape(str(p)) + r", line 2: 2 field\(s\).*\['JF'\]"):
        read_csv_checked(p, ["miou"])
    p.write_text("miou,JF\n0.5,0.4\n")
    with pytest.raises(DataError, match=re.escape(str(p)) + r" has no column\(s\) \['coverage'\]"):
        read_csv_checked(p, ["miou", "coverage"])
    p.write_text("miou,JF\n0.5,0.4\n0.6,0.3\n")
    with pytest.raises(DataError, match=re.escape(str(p)) + r" has 2 data row\(s\); expected exactly 1"):
        read_csv_checked(p, ["miou"], rows=1)
    p.write_text("miou,JF\n0.5,0.4\n,0.3\n")
    with pytest.raises(DataError, match=re.escape(str(p)) + r": column 'miou' has no value .* line\(s\) \[3\]"):
        read_csv_checked(p, ["miou"], nonnull=["miou"])
    p.write_text("miou,JF\n0.5,nan\n")  # a metric written as nan is a value, not damage
    df = read_csv_checked(p, ["miou", "JF"], rows=1)
    assert df["miou"].iloc[0] == 0.5 and math.isnan(df["JF"].iloc[0])


def _write(path, **cols):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([cols]).to_csv(path, index=False)


def _sweep(path, rows=((0.1, 0.3, False), (0.2, 0.4, True), (0.3, 0.35, False))):
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=["threshold", "miou", "chosen_with_gt"])
    df["split"] = "val"
    df["config_hash"] = "abc123"
    df.to_csv(path, index=False, float_format="%.6g")
    return path


def _run(res, name="weak/s0"):
    d = res / name
    _sweep(d / "seeds" / "threshold_sweep.csv")
    _write(d / "crf" / "metrics.csv", miou=0.45, split="val")
    _write(d / "irn" / "ir_labels" / "metrics.csv", confident_pixel_accuracy=0.9, coverage=0.6, miou_confident=0.5)
    _write(d / "irn" / "masks" / "metrics.csv", miou=0.5, split="val")
    _write(d / "deeplab" / "metrics.csv", miou=0.6, JF=0.55, pseudo_masks="irn", split="val")
    (d / "benchmarks").mkdir(parents=True, exist_ok=True)
    (d / "benchmarks" / "cam_shard-1-of-2.tsv").write_text("s\th:m:s\tmax_rss\n10.0\t0:00:10\t100\n")
    (d / "benchmarks" / "cam_shard-2-of-2.tsv").write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t100\n")
    return d


def test_whole_run_reads_as_before(tmp_path):
    _run(tmp_path)
    row = experiment_row(tmp_path, "weak/s0")
    assert row["seed_threshold"] == 0.2 and row["seed_miou"] == 0.4 and row["crf_miou"] == 0.45
    assert row["ir_label_precision"] == 0.9 and row["ir_label_coverage"] == 0.6 and row["ir_label_miou"] == 0.5
    assert row["deeplab_miou"] == 0.6 and row["deeplab_jf"] == 0.55 and row["deeplab_pseudo_masks"] == "irn"
    assert row["time_cam_shard_s"] == 22.5 and math.isnan(row["time_train_irn_s"])
    assert chosen_threshold(tmp_path / "weak/s0/seeds/threshold_sweep.csv") == 0.2
    assert chosen_threshold(pd.read_csv(tmp_path / "weak/s0/seeds/threshold_sweep.csv")) == 0.2


def _cut_last_row(path, keep_fields):
    """Cut ``path`` after ``keep_fields`` fields of its last row (a killed writer)."""
    lines = path.read_text().splitlines()
    lines[-1] = ",".join(lines[-1].split(",")[:keep_fields])
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "rel", ["crf/metrics.csv", "irn/ir_labels/metrics.csv", "irn/masks/metrics.csv", "deeplab/metrics.csv"]
)
def test_cut_metrics_file_is_loud(tmp_path, rel):
    d = _run(tmp_path)
    f = d / rel
    header = f.read_text().splitlines()[0]
    f.write_text(header + "\n")  # header only
    with pytest.raises(DataError, match=re.escape(str(f)) + " has a header but no data rows"):
        summary_table(tmp_path, ["weak/s0"])
    _run(tmp_path)
    _cut_last_row(f, 1)
    with pytest.raises(DataError, match=re.escape(str(f)) + ", line 2"):
        summary_table(tmp_path, ["weak/s0"])
    f.write_text("")
    with pytest.raises(DataError, match=re.escape(str(f)) + " is empty"):
        summary_table(tmp_path, ["weak/s0"])


def test_metrics_file_missing_column_or_extra_row(tmp_path):
    d = _run(tmp_path)
    f = d / "deeplab" / "metrics.csv"
    _write(f, miou=0.6, pseudo_masks="irn")  # no JF: used to give NaN silently
    with pytest.raises(DataError, match=re.escape(str(f)) + r" has no column\(s\) \['JF'\]"):
        experiment_row(tmp_path, "weak/s0")
    f = d / "crf" / "metrics.csv"
    _run(tmp_path)
    pd.DataFrame({"miou": [0.45, 0.99]}).to_csv(f, index=False)  # two rows: which one?
    with pytest.raises(DataError, match=re.escape(str(f)) + r" has 2 data row\(s\); expected exactly 1"):
        experiment_row(tmp_path, "weak/s0")


def test_cut_benchmark_file_is_loud(tmp_path):
    d = _run(tmp_path)
    f = d / "benchmarks" / "cam_shard-2-of-2.tsv"
    f.write_text("s\th:m:s\tmax_rss\n")
    with pytest.raises(DataError, match=re.escape(str(f)) + " has a header but no data rows"):
        stage_times(d / "benchmarks")
    f.write_text("s\th:m:s\tmax_rss\n12.5\t0:00")
    with pytest.raises(DataError, match=re.escape(str(f)) + " ends mid-line"):
        stage_times(d / "benchmarks")
    f.write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\n")
    with pytest.raises(DataError, match=re.escape(str(f)) + ", line 2: 2 field"):
        stage_times(d / "benchmarks")
    f.write_text("h:m:s\tmax_rss\n0:00:12\t100\n")
    with pytest.raises(DataError, match=re.escape(str(f)) + r" has no column\(s\) \['s'\]"):
        stage_times(d / "benchmarks")
    f.write_text("s\th:m:s\tmax_rss\n\t0:00:12\t100\n")
    with pytest.raises(DataError, match=re.escape(str(f)) + ": column 's' has no value"):
        stage_times(d / "benchmarks")


def test_cut_threshold_sweep_is_loud(tmp_path):
    d = _run(tmp_path)
    f = d / "seeds" / "threshold_sweep.csv"
    for keep in (1, 2, 4):  # cut in the last row before / after chosen_with_gt
        _sweep(f)
        _cut_last_row(f, keep)
        with pytest.raises(DataError, match=re.escape(str(f)) + ", line 4"):
            experiment_row(tmp_path, "weak/s0")
        with pytest.raises(DataError, match=re.escape(str(f))):
            chosen_threshold(f)
        # a table read by pandas (NaN in the cut columns) is refused too, without the file name
        with pytest.raises(DataError, match="threshold sweep"):
            chosen_threshold(pd.read_csv(f))
    f.write_text("threshold,miou,chosen_with_gt\n")
    with pytest.raises(DataError, match=re.escape(str(f)) + " has a header but no data rows"):
        chosen_threshold(f)
    f.write_text("")
    with pytest.raises(DataError, match=re.escape(str(f)) + " is empty"):
        experiment_row(tmp_path, "weak/s0")


def test_threshold_sweep_content_checks(tmp_path):
    f = tmp_path / "sweep.csv"
    pd.DataFrame({"threshold": [0.1, 0.2], "miou": [0.3, 0.4]}).to_csv(f, index=False)
    with pytest.raises(DataError, match=re.escape(str(f)) + r" has no column\(s\) \['chosen_with_gt'\]"):
        chosen_threshold(f)
    _sweep(f, rows=((0.1, 0.3, False), (0.1, 0.4, True)))
    with pytest.raises(DataError, match=re.escape(str(f)) + r" has more than one row for threshold\(s\) \[0.1\]"):
        chosen_threshold(f)
    _sweep(f, rows=((0.1, 0.3, False), (0.2, 0.4, False)))
    with pytest.raises(DataError, match=re.escape(str(f)) + " has 0 rows marked chosen_with_gt"):
        chosen_threshold(f)
    _sweep(f, rows=((0.1, 0.4, True), (0.2, 0.4, True)))
    with pytest.raises(DataError, match="has 2 rows marked chosen_with_gt"):
        chosen_threshold(f)
    _sweep(f, rows=((0.1, 0.3, True), (0.2, 0.4, False)))
    with pytest.raises(DataError, match="not the one of the highest mIoU"):
        chosen_threshold(f)
    _sweep(f)
    with pytest.raises(DataError, match=r"expected one row for each of \[0.1, 0.2, 0.3, 0.4\]"):
        chosen_threshold(f, thresholds=[0.1, 0.2, 0.3, 0.4])
    assert chosen_threshold(f, thresholds=[0.3, 0.1, 0.2]) == 0.2
    assert sweep_chosen_row(read_sweep(f), f)["miou"] == 0.4
    with pytest.raises(DataError, match="has no rows"):
        chosen_threshold(pd.DataFrame({"threshold": [], "miou": [], "chosen_with_gt": []}))
