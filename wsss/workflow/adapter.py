"""Glue for the thin rule scripts: logging into the rule's log file and error reporting."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, List, Sequence


@contextlib.contextmanager
def logged(snakemake) -> Iterator[logging.Logger]:
    """Send stdout, stderr (tqdm bars included) and ``logging`` of a rule script to its log file, and
    limit the job to its ``threads`` (:func:`wsss.workflow.threads.limit_threads`)."""
    from .threads import limit_threads, rule_kind

    rule = getattr(snakemake, "rule", None)
    if rule is not None:
        rule_kind(rule)  # a rule without a thread policy fails here, loudly
    limit_threads(getattr(snakemake, "threads", 1))
    log_path = Path(snakemake.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as fh, contextlib.redirect_stderr(fh), contextlib.redirect_stdout(fh):
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield logging.getLogger("wsss")
        except Exception:
            logging.getLogger("wsss").exception("rule %s failed", getattr(snakemake, "rule", "?"))
            raise
        finally:
            root.removeHandler(handler)


def scatter_index(scatteritem: str) -> tuple[int, int]:
    """Snakemake's ``{scatteritem}`` ``"i-of-n"`` (1-based) -> ``(i - 1, n)``."""
    try:
        i, n = scatteritem.split("-of-")
        i, n = int(i), int(n)
    except ValueError:
        raise ValueError(f"not a scatter item: {scatteritem!r} (expected 'i-of-n')") from None
    if not 1 <= i <= n:
        raise ValueError(f"scatter item {scatteritem!r} out of range")
    return i - 1, n


def shard_ids(ids: Sequence[str], shard_index: int, num_shards: int) -> List[str]:
    """Contiguous split of ``ids`` into ``num_shards`` parts (sizes differ by at most one): the ids
    of shard ``shard_index`` (0-based, as :func:`scatter_index` returns it)."""
    import numpy as np

    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard {shard_index} out of range for {num_shards} shards")
    bounds = np.linspace(0, len(ids), num_shards + 1).round().astype(int)
    return list(ids[bounds[shard_index] : bounds[shard_index + 1]])
