"""The thread policy (wsss.workflow.threads): every rule has one, and jobs and pool workers get it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wsss.workflow import process_context
from wsss.workflow.threads import KINDS, RULE_KINDS, rule_kind, torch_job, worker_initializer

ROOT = Path(__file__).resolve().parents[1]


def rule_names():
    names = set()
    for smk in (ROOT / "rules").glob("*.smk"):
        text = smk.read_text()
        names |= set(re.findall(r"^rule (\w+):", text, flags=re.M))
    return names


def test_every_rule_has_a_thread_policy():
    names = rule_names()
    assert len(names) > 15
    for name in names:
        assert rule_kind(name) in KINDS
    # and the table names no rule that does not exist
    assert set(RULE_KINDS) <= names
    # the download rules are made per archive in rules/data.smk
    assert 'f"download_{_archive}"' in (ROOT / "rules" / "data.smk").read_text()
    assert rule_kind("download_voc2012_trainval") == "serial"


def test_unknown_rule_fails_loudly():
    with pytest.raises(KeyError, match="no thread policy.*known: "):
        rule_kind("nonexistent_rule")


def test_torch_job_policy():
    assert torch_job(4, cuda=True) == (1, 3)
    assert torch_job(1, cuda=True) == (1, 0)
    assert torch_job(2, cuda=False) == (2, 0)
    assert torch_job(0, cuda=False) == (1, 0)


PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
import numpy, torch
from threadpoolctl import threadpool_info
from wsss.workflow.threads import limit_threads
limit_threads({n})
print(json.dumps({{"torch": torch.get_num_threads(), "omp": os.environ["OMP_NUM_THREADS"],
                  "pools": sorted({{i["num_threads"] for i in threadpool_info()}})}}))
"""


@pytest.mark.parametrize("n", [1, 2])
def test_limit_threads_sets_torch_blas_and_env(n):
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), n=n)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"torch": n, "omp": str(n), "pools": [n]}


def _worker_threads(_):
    import os

    from threadpoolctl import threadpool_info

    return os.environ["OMP_NUM_THREADS"], sorted({i["num_threads"] for i in threadpool_info()}), _SEEN


_SEEN = None


def _remember(value):
    global _SEEN
    _SEEN = value


def test_pool_workers_compute_with_one_thread_and_run_the_initializer():
    import numpy  # noqa: F401 (a BLAS pool is loaded before the fork)

    with process_context().Pool(2, initializer=worker_initializer, initargs=(_remember, "state")) as pool:
        results = pool.map(_worker_threads, range(4))
    for omp, pools, seen in results:
        assert omp == "1"
        assert pools == [1]
        assert seen == "state"
