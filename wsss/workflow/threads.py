"""Thread policy of every job: how a job spends the ``threads`` Snakemake gives it.

Left alone, torch's OpenMP pool, numpy's BLAS and every worker process would each start one thread
per core of the *node*, and jobs packed on a node (or a job beside its own DataLoader workers)
then wait on each other's threads: on a busy 2-core machine a random walk with 2 torch threads
took 7-35 s per image against 0.9 s with one. ``bench/threads.py`` measures each kind of work
with 1 and 2 threads, alone and beside a second job; the README ("Threads") has its figures. The
policy that follows from them:

* :func:`limit_threads` is applied to every rule script (``wsss.workflow.adapter.logged``) with
  the job's ``threads``: the ``OMP/MKL/OPENBLAS/NUMEXPR/VECLIB`` environment variables (read by
  libraries loaded later and by child processes), the BLAS/OpenMP pools already loaded
  (``threadpoolctl``) and torch's intra-op threads when torch is loaded.
* **Per-image CPU pools** (CRF, IR labels, seed masks, AffinityNet labels): ``threads`` worker
  processes with **one thread each** (:func:`worker_initializer`): pydensecrf and numpy work per
  image gains nothing from threads, and processes do not contend for a shared pool.
* **Torch jobs** (training, CAM inference, DeepLab prediction, IRN/AffinityNet masks):
  :func:`torch_job` — on a GPU, the job's threads feed DataLoader workers (``threads - 1``) and
  the main process keeps one; on the CPU the whole job is compute, so torch gets every thread and
  no loader worker competes with it (``bench/loader_workers.py``: 0.25 s per image with 0
  workers against 0.30 s with one worker beside 2 compute threads on 2 cores).
* **Random walk**: one intra-op thread (``wsss.refine.random_walk``'s ``cpu_threads=1``); the
  walk is thousands of small ops for which threads cost more than they bring.

Rules request threads accordingly (``rules/*.smk``; ``tests/test_threads.py`` checks every rule
has a kind here). This module imports neither torch nor numpy (the Snakefile side imports it).
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Tuple

#: environment variables read by OpenMP, MKL, OpenBLAS, numexpr and Accelerate at load time
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)

#: how each rule spends its threads (see the module docstring); ``serial``: one thread, no workers
RULE_KINDS: Dict[str, str] = {
    "synthetic_dataset": "pool",
    "image_labels": "serial",
    "dataset_stats": "serial",
    "voc_train_aug_list": "serial",
    "coco_masks": "serial",
    "pretrain": "torch",
    "train_classifier": "torch",
    "cam_shard": "torch",
    "seed_eval": "serial",
    "crf_shard": "pool",
    "ir_labels_shard": "pool",
    "train_irn": "torch",
    "irn_masks_shard": "torch",
    "affinity_labels_shard": "pool",
    "train_affinitynet": "torch",
    "affinitynet_masks_shard": "torch",
    "eval_masks": "serial",
    "seed_masks_shard": "pool",
    "train_deeplab": "torch",
    "deeplab_predict_shard": "torch",
    "eval_deeplab": "serial",
    "summary_table": "serial",
    "training_curves": "serial",
    "mask_gallery": "serial",
    "irn_gallery": "torch",
}
KINDS = ("serial", "pool", "torch")


def rule_kind(rule: str) -> str:
    """The kind of ``rule`` (KeyError naming the valid rules for one this table does not know)."""
    for prefix in ("download_",):  # the download rules are made per archive (rules/data.smk)
        if rule.startswith(prefix):
            return "serial"
    try:
        return RULE_KINDS[rule]
    except KeyError:
        raise KeyError(f"rule {rule!r} has no thread policy; known: {', '.join(sorted(RULE_KINDS))}") from None


def limit_threads(n: int) -> int:
    """Limit this process (and the processes it starts) to ``n`` compute threads: environment
    variables, loaded BLAS/OpenMP pools (threadpoolctl) and torch's intra-op threads if torch is
    loaded. Returns ``n``."""
    n = max(1, int(n))
    for var in THREAD_ENV:
        os.environ[var] = str(n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


def worker_initializer(initializer=None, *initargs) -> None:
    """Initializer of per-image pool workers: one thread each, then ``initializer(*initargs)``."""
    limit_threads(1)
    if initializer is not None:
        initializer(*initargs)


def torch_job(threads: int, cuda: bool) -> Tuple[int, int]:
    """``(torch intra-op threads, DataLoader workers)`` of a torch job given ``threads`` cores:
    on a GPU the main process keeps one thread and the rest load data; on the CPU torch computes
    with all of them and data loads in the main process."""
    threads = max(1, int(threads))
    if cuda:
        return 1, threads - 1
    return threads, 0
