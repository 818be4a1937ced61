"""Faults a hostile user meets: forced reruns, interrupted shard jobs, bad labels, damaged caches.

The end-to-end cases (forced rerun after a model change, damaged CAM shard, NaN label) run on the
tiny preset's DAG in tests/test_workflow.py, which builds it once for the whole module.
"""

from __future__ import annotations

import os

import pytest

from wsss.workflow.journal import ShardJournal, journal_for


def test_journal_resumes_only_an_interrupted_attempt_of_the_same_job(tmp_path):
    path = tmp_path / "shard-1-of-2.json.journal"
    j = ShardJournal(path, {"config_hash": "abc", "inputs": {"a.h5": [1, 2, 3]}})
    assert j.start() == set()
    j.record("img1")
    j.record("img2")
    j.close()  # killed here: the journal stays
    again = ShardJournal(path, {"config_hash": "abc", "inputs": {"a.h5": [1, 2, 3]}})
    assert again.start() == {"img1", "img2"}
    assert again.start(lambda i: i == "img2") == {"img1", "img2"}  # started already: same answer
    again.close()
    # a file that disappeared is redone
    assert ShardJournal(path, again.identity).start(lambda i: i == "img2") == {"img2"}
    # other inputs (an upstream job reran): nothing is reused, and the old journal is replaced
    other = ShardJournal(path, {"config_hash": "abc", "inputs": {"a.h5": [1, 2, 4]}})
    assert other.start() == set()
    other.close()
    assert ShardJournal(path, again.identity).start() == set()
    # a finished job leaves no journal: its next run (forced) starts from nothing
    done = ShardJournal(path, again.identity)
    done.start()
    done.record("img1")
    done.finish()
    assert not path.exists()
    assert ShardJournal(path, again.identity).start() == set()


def test_garbage_journal_is_ignored(tmp_path):
    path = tmp_path / "j"
    path.write_bytes(b"\xff\xfe not json\nimg1\n")
    assert ShardJournal(path, {"a": 1}).start() == set()
    path.write_text("")
    assert ShardJournal(path, {"a": 1}).start() == set()


def test_journal_identity_follows_the_input_files(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"one")
    a = journal_for(tmp_path / "m.json", config_hash="h", inputs=[f])
    a.start()
    a.record("x")
    a.close()
    assert journal_for(tmp_path / "m.json", config_hash="h", inputs=[f]).start() == {"x"}
    # the model is retrained (written to a temp name and renamed into place)
    tmp = tmp_path / ".tmp-model.pt"
    tmp.write_bytes(b"two")
    os.replace(tmp, f)
    assert journal_for(tmp_path / "m.json", config_hash="h", inputs=[f]).start() == set()
    assert journal_for(tmp_path / "m.json", config_hash="other", inputs=[f]).start() == set()


def test_unlabelled_images_are_skipped_by_every_stage_on_coco(tmp_path):
    """COCO has images without any label: with ``classifier.on_unlabelled: skip`` the CAM stage
    records them as skipped and CRF, seeds, IR labels and every evaluation leave them out; with
    ``error`` CAM inference names them (it used to crash interpolating a 0-channel map)."""
    import pandas as pd
    from test_coco import write_mini_coco

    from wsss.cams import CamStore
    from wsss.config import run_config, validate_config
    from wsss.data import open_dataset
    from wsss.data.base import write_labels_csv
    from wsss.data.coco import prepare_coco_dataset
    from wsss.engine import save_model
    from wsss.io import DataError
    from wsss.methods import build_classifier
    from wsss.pipeline import (
        cam_ids,
        crf_shard,
        evaluate_mask_shards,
        evaluate_seeds,
        infer_cam_shard,
        ir_labels_shard,
        seed_masks_shard,
    )
    from wsss.workflow.markers import read_shard_markers_full

    root = write_mini_coco(tmp_path / "coco")
    prepare_coco_dataset(root, crowd="background", progress=False)

    def config(on_unlabelled):
        raw = {
            "dataset": {"name": "coco14", "root": str(root), "train_split": "train", "eval_split": "val"},
            "classifier": {"on_unlabelled": on_unlabelled},
            "cam": {"scales": [1.0]},
            "seed_eval": {"gallery_images": 1},
        }
        return run_config(validate_config(raw), "baseline/s0")

    cfg = config("skip")
    ds = open_dataset(cfg)
    ids = cam_ids(cfg, ds)
    assert ids == ["9", "25", "30", "42"]  # 25: only a crowd region, 30: no annotation
    labels_csv = tmp_path / "labels.csv"
    write_labels_csv(labels_csv, ids, {i: ds.labels(i) for i in ids}, ds.class_names)
    model = tmp_path / "model.pt"
    save_model(model, build_classifier(cfg, ds.num_fg_classes), {})

    with pytest.raises(DataError, match=r"no image-level label.*'25'.*on_unlabelled: skip"):
        infer_cam_shard(config("error"), str(model), str(labels_csv), str(tmp_path / "err.h5"), 0, 1, progress=False)

    cam = tmp_path / "cams" / "shard-1-of-1.h5"
    infer_cam_shard(cfg, str(model), str(labels_csv), str(cam), 0, 1, progress=False)
    with CamStore([cam]) as store:
        assert sorted(store.ids()) == ["42", "9"] and store.skipped == {"25", "30"}
    evaluate_seeds(
        cfg, [str(cam)], str(tmp_path / "seeds" / "sweep.csv"), str(tmp_path / "seeds" / "g.png"), progress=False
    )
    assert len(pd.read_csv(tmp_path / "seeds" / "sweep.csv")) > 0
    crf_marker = tmp_path / "crf" / "shard-1-of-1.json"
    crf_shard(cfg, [str(cam)], str(crf_marker), 0, 1, progress=False, sweep_csv=str(tmp_path / "seeds" / "sweep.csv"))
    seed_marker = tmp_path / "seeds" / "masks" / "shard-1-of-1.json"
    seed_masks_shard(cfg, [str(cam)], str(tmp_path / "seeds" / "sweep.csv"), str(seed_marker), 0, 1)
    ir_marker = tmp_path / "ir" / "shard-1-of-1.json"
    ir_labels_shard(cfg, [str(cam)], str(ir_marker), 0, 1, progress=False)
    for marker in (crf_marker, seed_marker, ir_marker):
        mask_dir, written, skipped = read_shard_markers_full([marker])
        assert sorted(written) == ["42", "9"] and skipped == {"25", "30"}, marker
        assert sorted(p.stem for p in mask_dir.glob("*.png")) == ["42", "9"]
        row = evaluate_mask_shards(
            cfg, [str(marker)], str(marker.parent / "m.csv"), str(marker.parent / "pc.csv"), kind="crf"
        )
        assert 0 <= row["miou"] <= 1
