"""Glue for the thin rule scripts: logging into the rule's log file and error reporting."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def logged(snakemake) -> Iterator[logging.Logger]:
    """Send stdout, stderr (tqdm bars included) and ``logging`` of a rule script to its log file."""
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
