"""Formula-driven pretraining: the ``pretrained: procedural`` weights (docs/pretrain.md).

:mod:`wsss.pretrain.procedural` renders the images, :mod:`wsss.pretrain.train` trains a backbone
on them. This module only names where the weights live; it imports neither torch nor numpy, so the
Snakefile can use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

#: The ``pretrained`` value that selects the formula-driven weights.
PROCEDURAL_SPEC = "procedural"
#: Folder of the formula-driven weights (``<dir>/<arch>/model.pt``), relative to the workflow's
#: working directory, where every job runs; independent of the dataset.
PROCEDURAL_DIR = "results/pretrain"


def base_arch(arch: str) -> str:
    """The network whose weights backbone ``arch`` loads: ``resnet50_os8`` -> ``resnet50``."""
    return arch[: -len("_os8")] if arch.endswith("_os8") else arch


def weights_path(arch: str) -> Path:
    """Where ``pretrained: procedural`` reads the weights of backbone ``arch``."""
    return Path(PROCEDURAL_DIR) / base_arch(arch) / "model.pt"


def weights_inputs(spec: Any, arch: str) -> List[str]:
    """``[weights file]`` when ``spec`` is ``procedural`` (a job's input, so the DAG makes it
    first), else ``[]``."""
    return [str(weights_path(arch))] if spec == PROCEDURAL_SPEC else []
