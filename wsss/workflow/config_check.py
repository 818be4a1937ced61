"""The Snakefile's config work that needs torch, in a child process, remembered per config and code.

At DAG build time the Snakefile needs two things that import torch: the checks of
:func:`wsss.config.validate_config` that the schema cannot express (registry names, option names,
pretrained weights, networks built on PyTorch's meta device, every experiment's merged config),
and the model files each run's classifier training reads (:func:`wsss.pipeline.classifier_inputs`,
e.g. SMAF's teacher). Importing torch would cost every ``snakemake`` start, a dry run included,
seconds and most of its memory, so the Snakefile validates with ``extra_checks=False`` in its own
process and asks :func:`checked_config` for the rest. :func:`checked_config` runs :func:`torch_facts`
in a child Python (the same interpreter, ``python -m wsss.workflow.config_check``) and keeps its
answer in ``<cache_dir>/config-<key>.json``; the key hashes the config, every ``wsss`` source file
(path, size, modification time) and the installed torch / torchvision versions, so the next
``snakemake`` with the same config and code reads the file and starts no child. A config error is
never remembered: :class:`wsss.config.ConfigError` is raised with the same message every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Mapping

#: Bump when :func:`torch_facts` returns something new (cached answers of older code are not read).
FORMAT = 2


def _code_fingerprint() -> list:
    root = Path(__file__).resolve().parents[1]  # the wsss package
    out = []
    for p in sorted(root.rglob("*")):
        if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts:
            st = p.stat()
            out.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    return out


def _versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "torchvision"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = ""
    return out


def cache_key(cfg: Mapping[str, Any], python: str = sys.executable) -> str:
    """Hash of ``cfg``, the package's source files, the interpreter and its torch / torchvision."""
    h = hashlib.sha256()
    h.update(pickle.dumps(dict(cfg), protocol=4))
    h.update(json.dumps([FORMAT, python, _versions(), _code_fingerprint()]).encode())
    return h.hexdigest()[:24]


def torch_facts(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """What the Snakefile needs from torch (runs in the child): every check of
    :func:`wsss.config.validate_config` (raises :class:`~wsss.config.ConfigError`) and
    ``{"classifier_inputs": {run: [model files its classifier training reads]},
    "needs_saliency": {run: whether it trains on saliency maps}}``."""
    from .. import pipeline
    from ..config import run_config, run_names, validate_config
    from ..methods import needs_saliency

    full = validate_config(cfg)
    runs = {run: run_config(full, run) for run in run_names(full)}
    return {
        "classifier_inputs": {run: [str(p) for p in pipeline.classifier_inputs(rc)] for run, rc in runs.items()},
        "needs_saliency": {run: bool(needs_saliency(rc)) for run, rc in runs.items()},
    }


def checked_config(
    cfg: Mapping[str, Any], cache_dir: str | os.PathLike, python: str = sys.executable
) -> Dict[str, Any]:
    """:func:`torch_facts` of ``cfg`` (a config validated with ``extra_checks=False``), from the
    cache or from a child process running ``python``; raises :class:`~wsss.config.ConfigError`."""
    from ..config import ConfigError

    path = Path(cache_dir) / f"config-{cache_key(cfg, python)}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    package_parent = str(Path(__file__).resolve().parents[2])  # this checkout's wsss in the child too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(
        [python, "-m", __name__], input=pickle.dumps(dict(cfg), protocol=4), capture_output=True, env=env, check=False
    )
    try:
        answer = json.loads(proc.stdout.decode(errors="replace").strip().splitlines()[-1])
    except (IndexError, ValueError):
        answer = None
    if proc.returncode != 0 or not isinstance(answer, dict):
        raise RuntimeError(
            f"the config checks ({python} -m {__name__}) failed with exit status {proc.returncode}:\n"
            + proc.stderr.decode(errors="replace")[-4000:]
        )
    if "error" in answer:
        raise ConfigError(answer["error"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(answer, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return answer


def _main() -> int:
    """The child: a pickled config on stdin; its :func:`torch_facts` or ``{"error": message}`` as
    the last line of stdout."""
    from ..config import ConfigError

    cfg = pickle.loads(sys.stdin.buffer.read())
    try:
        answer = torch_facts(cfg)
    except ConfigError as e:
        answer = {"error": str(e)}
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
