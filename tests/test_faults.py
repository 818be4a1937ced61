"""Faults a hostile user meets: forced reruns, interrupted shard jobs, bad labels, damaged caches.

Unit cases first; the end-to-end ones run the tiny preset's DAG once (module fixture) and then
damage it the way a user would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
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
