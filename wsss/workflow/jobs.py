"""What a training or inference job sets up before it runs: the device and DataLoader workers for
the cores it was given, and the resume checkpoint of another config set aside."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..config import config_hash

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def device_and_workers(threads: int) -> tuple[torch.device, int]:
    """The device (CUDA when present) and DataLoader workers for a job given ``threads`` cores, with
    torch's intra-op threads set by the thread policy (:func:`wsss.workflow.threads.torch_job`)."""
    import torch

    from .threads import limit_threads, torch_job

    cuda = torch.cuda.is_available()
    compute, workers = torch_job(threads, cuda)
    limit_threads(compute)
    return torch.device("cuda" if cuda else "cpu"), workers


def set_aside_stale_checkpoint(path: Path, resolved: Mapping[str, Any]) -> None:
    """A resume checkpoint of another config is renamed (never deleted) and training starts over."""
    if not path.exists():
        return
    from ..engine import load_checkpoint

    old = load_checkpoint(path).get("config_hash")
    if old != config_hash(resolved):
        stale = path.with_name(f"last.stale-{old}.pt")
        os.replace(path, stale)
        log.warning("checkpoint %s belongs to another config; kept as %s, starting over", path, stale)
