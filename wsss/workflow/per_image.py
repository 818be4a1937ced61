"""One resumable per-image loop for the mask-producing shard stages (CRF, IR labels, seed masks).

:func:`map_images` runs ``fn(image_id)`` for every id a job has not already written (see
:mod:`wsss.workflow.journal`), in this process or in a pool of ``workers`` processes, with a tqdm
bar, and records every finished id in the job's journal.

Pools use :func:`wsss.workflow.process_context` (``fork``): Snakemake runs rule scripts as
``__main__``, and a ``spawn`` child would re-execute it. Workers get their read-only state once,
through ``initializer(*initargs)``, and ``worker_fn(image_id)`` must be a module-level function. Each
worker computes with one thread (:func:`wsss.workflow.threads.worker_initializer`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

from tqdm import tqdm

from . import process_context
from .journal import NoJournal
from .threads import worker_initializer


def todo_ids(ids: Sequence[str], journal: Any, exists: Callable[[str], bool]) -> tuple[list, int]:
    """Start ``journal`` (None: nothing is reused) and return (ids left to do, number reused)."""
    journal = journal if journal is not None else NoJournal()
    done = journal.start(exists)
    todo = [i for i in ids if i not in done]
    return todo, len(ids) - len(todo)


def map_images(
    ids: Sequence[str],
    fn: Callable[[str], Any],
    *,
    exists: Callable[[str], bool],
    journal: Any = None,
    workers: int = 1,
    worker_fn: Optional[Callable[[str], Any]] = None,
    initializer: Optional[Callable[..., None]] = None,
    initargs: tuple = (),
    desc: str = "images",
    progress: bool = True,
) -> Dict[str, int]:
    """Run ``fn`` on each id of ``ids`` this job has not written yet; ``{"written": n, "skipped": m}``.

    ``exists(id)``: whether the id's output file is there (a journal entry without its file is
    redone). ``journal``: a :class:`wsss.workflow.journal.ShardJournal` (None: every id is done, nothing
    recorded). The journal is left open for the caller to ``finish()`` after its marker is written.
    """
    journal = journal if journal is not None else NoJournal()
    todo, skipped = todo_ids(ids, journal, exists)
    bar = tqdm(total=len(ids), initial=skipped, desc=desc, disable=not progress, mininterval=2.0, unit="img")
    try:
        workers = max(1, min(int(workers), len(todo)))
        if workers == 1 or worker_fn is None:
            for image_id in todo:
                fn(image_id)
                journal.record(image_id)
                bar.update()
        else:
            # one thread per worker process (wsss.workflow.threads)
            pool_args = {"initializer": worker_initializer, "initargs": (initializer, *initargs)}
            with process_context().Pool(workers, **pool_args) as pool:
                for image_id in pool.imap_unordered(worker_fn, todo, chunksize=1):
                    journal.record(image_id)
                    bar.update()
    finally:
        bar.close()
        journal.close()
    return {"written": len(todo), "skipped": skipped}
