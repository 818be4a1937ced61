"""Which outputs under ``results/`` another package version or another config made (``wsss status``).

Snakemake reruns a job when its rule, its params or its inputs change, not when code inside
``wsss/`` changes. Every output records the package version and the config hash that made it;
:func:`collect_status` reads those records with cheap reads only and compares them with
``wsss.__version__`` and, when a config is given, with the hash of the stage's current params
(:func:`wsss.workflow.stages.stage_params` of the run's config, as the rules compute them):

==================================  ====================  ===============================================
output                              rule                  version and config hash read from
==================================  ====================  ===============================================
``classifier/model.pt``             train_classifier      checkpoint fields ``package_version``,
``irn/model.pt``                    train_irn             ``config_hash`` (the pickle header only, no
``affinitynet/model.pt``            train_affinitynet
``deeplab/model.pt``                train_deeplab         weights are read, torch is not imported)
``cams/shard-*.h5``                 cam_shard             HDF5 file attrs ``package_version``, ``config_hash``
``*/shard-*.json`` (shard markers)  by the marker's kind  JSON fields ``package_version``, ``config_hash``
``seeds/threshold_sweep.csv``       seed_eval             first row: ``package_version``, ``config_hash``
                                                          (the hash of the CAMs it evaluated: stage ``cam``)
``crf/metrics.csv``,                eval_masks            first row: ``package_version``; the hash in the
``irn/{ir_labels,masks}/metrics.csv``,                    ``mask_dir`` column (``masks-<hash>``) is that of
``affinitynet/masks/metrics.csv``                         the masks it evaluated (crf, ir_labels, irn_infer,
                                                          affinitynet_infer)
``deeplab/metrics.csv``             eval_deeplab          first row: ``package_version``, ``config_hash``
``tables/{summary,ablation}.csv``   summary_table         first row: ``package_version`` (no config hash)
==================================  ====================  ===============================================

An output is *stale* when its recorded version differs from the running package's, when its
config hash differs from the current one (config match ``no``), or when its record cannot be read
(a damaged or foreign file, or one that records no version). Config match is ``unknown`` when no
config was given, the output records no hash, or its run (``<experiment>/s<seed>``) or dataset is
not in the config; ``unknown`` alone does not make an output stale. Work folders (``work/``: resume
checkpoints), mask folders (``masks-<hash>/``: one PNG per image, covered by their shard markers),
benchmarks, logs and temporary files are not listed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from . import __version__

#: shard marker ``kind`` -> (rule that writes it, stage whose params its config hash covers)
MARKER_KINDS: Dict[str, Tuple[str, str]] = {
    "crf": ("crf_shard", "crf"),
    "ir_labels": ("ir_labels_shard", "ir_labels"),
    "irn": ("irn_masks_shard", "irn_infer"),
    "irn_confidence": ("irn_masks_shard", "irn_infer"),
    "affinity_labels": ("affinity_labels_shard", "affinity_labels"),
    "affinitynet": ("affinitynet_masks_shard", "affinitynet_infer"),
    "seeds": ("seed_masks_shard", "seed_masks"),
    "deeplab": ("deeplab_predict_shard", "deeplab_predict"),
}
#: folder of a ``model.pt`` -> (rule, stage)
MODEL_STAGES: Dict[str, Tuple[str, str]] = {
    "classifier": ("train_classifier", "classifier"),
    "irn": ("train_irn", "irn_train"),
    "affinitynet": ("train_affinitynet", "affinitynet_train"),
    "deeplab": ("train_deeplab", "deeplab_train"),
}
#: ``kind`` column of a mask evaluation's metrics.csv -> stage of the masks it evaluated
EVAL_KINDS: Dict[str, str] = {
    "crf": "crf",
    "ir_labels": "ir_labels",
    "irn": "irn_infer",
    "affinitynet": "affinitynet_infer",
}
#: folders never descended into (see the module docstring)
SKIP_DIRS = ("work", "benchmarks", ".snakemake")
_MASKS_HASH = re.compile(r"masks-([0-9a-f]+)$")


@dataclass
class OutputStatus:
    """What one output records and how that compares with the current package and config."""

    path: Path
    rule: str
    version: Optional[str]  # recorded package version (None: not recorded or unreadable)
    config_hash: Optional[str] = None  # recorded config hash
    expected_hash: Optional[str] = None  # hash of the current config of its stage (None: unknown)
    note: str = ""
    current_version: str = field(default=__version__)

    @property
    def config_match(self) -> str:
        """``yes``, ``no`` or ``unknown`` (see the module docstring)."""
        if self.config_hash is None or self.expected_hash is None:
            return "unknown"
        return "yes" if self.config_hash == self.expected_hash else "no"

    @property
    def stale(self) -> bool:
        return self.version != self.current_version or self.config_match == "no"


# ----------------------------------------------------------------------------------------------
# config


def load_config(configfiles: Sequence[str | os.PathLike], extra_checks: bool = False) -> Dict[str, Any]:
    """The validated workflow config of ``configfiles``, merged in order as Snakemake merges
    ``--configfile`` files (later files override earlier keys, mappings merged recursively), then
    validated by :func:`wsss.config.validate_config` as ``rules/common.smk`` does: schema, defaults,
    numbers and ranges (``extra_checks``: also the registry checks, which import torch and change
    nothing in the config)."""
    import yaml

    from .config import ConfigError, deep_merge, validate_config

    if not configfiles:
        raise ConfigError("no config file given")
    merged: Dict[str, Any] = {}
    for p in configfiles:
        p = Path(p)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {p} must hold a mapping, got {type(raw).__name__}")
        merged = deep_merge(merged, raw)
    return validate_config(merged, extra_checks=extra_checks)


class ExpectedHashes:
    """Config hashes of each (run, stage) under the current config, as the rules compute them."""

    def __init__(self, cfg: Optional[Mapping[str, Any]]):
        self.cfg = cfg
        self._runs: Dict[str, Any] = {}
        if cfg is not None:
            from .config import dataset_tag, run_names

            self.dataset = dataset_tag(cfg)
            self.runs = set(run_names(cfg))
        else:
            self.dataset, self.runs = None, set()

    def run_of(self, rel: Path) -> Optional[str]:
        """The run (``<experiment>/s<seed>``) of ``rel`` (a path relative to ``results/``) if it
        belongs to the configured dataset and one of its runs, else None."""
        parts = rel.parts
        if self.cfg is None or len(parts) < 4 or parts[0] != self.dataset:
            return None
        run = f"{parts[1]}/{parts[2]}"
        return run if run in self.runs else None

    def run_config(self, run: str) -> Dict[str, Any]:
        if run not in self._runs:
            from .config import run_config

            self._runs[run] = run_config(self.cfg, run, extra_checks=False)  # as rules/common.smk
        return self._runs[run]

    def stage_hash(self, run: str, stage: str, extra: Optional[Mapping[str, Any]] = None) -> str:
        from .config import config_hash
        from .workflow.stages import stage_params

        params = stage_params(self.run_config(run), stage)
        if extra:
            params.update(extra)
        return config_hash(params)


# ----------------------------------------------------------------------------------------------
# readers (cheap: attrs, JSON, CSV header and first row, the pickle header of a checkpoint)


def _str_or_none(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    value = str(value)
    return value if value and value.lower() != "nan" else None


def read_cam_shard_record(path: Path) -> Dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as f:
        return {
            "package_version": _str_or_none(f.attrs.get("package_version")),
            "config_hash": _str_or_none(f.attrs.get("config_hash")),
            "complete": bool(f.attrs.get("complete", False)),
        }


def read_csv_first_row(path: Path) -> Dict[str, str]:
    """Header and first data row of a CSV as a dict (empty dict: no data row)."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        row = next(reader, None)
    if not header or row is None:
        return {}
    return dict(zip(header, row))


class _Opaque:
    """Stands in for every object a checkpoint's pickle names (tensors, storages, torch types)."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Dict(dict):
    """A dict that takes attributes (``state_dict()``'s ``_metadata``, set by the pickle's BUILD)."""


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save`` ``data.pkl`` without torch: plain containers and scalars come
    back as they are, anything else (tensors, storages) as :class:`_Opaque`; no code of the file
    runs, and the storages (the weights, separate zip members) are never read."""

    _SAFE = {
        ("collections", "OrderedDict"): _Dict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "list"): list,
        ("builtins", "dict"): dict,
        ("builtins", "tuple"): tuple,
    }

    def find_class(self, module: str, name: str) -> Any:
        return self._SAFE.get((module, name), _Opaque)

    def persistent_load(self, pid: Any) -> Any:
        return None


def read_checkpoint_metadata(path: Path, max_bytes: int = 64 << 20) -> Dict[str, Any]:
    """The top-level entries of a ``torch.save`` (zip format) file other than tensors, read from
    its pickle only: ``package_version``, ``config_hash``, ``config``, ``method`` ... Raises
    ``ValueError`` for a file in another format."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a zip-format torch checkpoint") from None
    with zf:
        names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if not names:
            raise ValueError(f"{path} has no data.pkl; not a torch checkpoint")
        info = zf.getinfo(min(names, key=len))
        if info.file_size > max_bytes:
            raise ValueError(f"{path}: pickle header of {info.file_size} bytes is too large to read cheaply")
        obj = _HeaderUnpickler(io.BytesIO(zf.read(info))).load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a dict (got {type(obj).__name__})")
    return {k: v for k, v in obj.items() if _plain(v)}


def _plain(value: Any) -> bool:
    """Whether ``value`` holds no stand-in (no tensor): scalars, strings, plain containers."""
    if isinstance(value, _Opaque):
        return False
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_plain(v) for v in value)
    return True


# ----------------------------------------------------------------------------------------------
# the walk


def iter_outputs(results: Path) -> Iterator[Path]:
    """Files under ``results`` that record their provenance (see the module docstring), sorted."""
    found: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(results):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not (d in SKIP_DIRS or d.startswith(("masks-", ".tmp-")) or (here == results and d == "logs"))
        )
        for name in filenames:
            if name.startswith(".tmp-"):
                continue
            if _classify(here / name) is not None:
                found.append(here / name)
    return iter(sorted(found))


def _classify(path: Path) -> Optional[str]:
    """Which reader a file needs: cam, marker, model, sweep, metrics, table (None: not listed)."""
    name, parent = path.name, path.parent.name
    if name.startswith("shard-") and name.endswith(".h5") and parent == "cams":
        return "cam"
    if name.startswith("shard-") and name.endswith(".json"):
        return "marker"
    if name == "model.pt" and parent in MODEL_STAGES:
        return "model"
    if name == "threshold_sweep.csv":
        return "sweep"
    if name == "metrics.csv":
        return "metrics"
    if name in ("summary.csv", "ablation.csv") and parent == "tables":
        return "table"
    return None


def _status_of(path: Path, rel: Path, kind: str, expected: ExpectedHashes) -> OutputStatus:
    run = expected.run_of(rel)

    def want(stage: str, extra: Optional[Mapping[str, Any]] = None) -> Optional[str]:
        return expected.stage_hash(run, stage, extra) if run is not None else None

    if kind == "cam":
        rec = read_cam_shard_record(path)
        note = "" if rec["complete"] else "incomplete shard"
        return OutputStatus(path, "cam_shard", rec["package_version"], rec["config_hash"], want("cam"), note)
    if kind == "marker":
        m = json.loads(path.read_text())
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
        rule, stage = MARKER_KINDS.get(m.get("kind"), (f"? (kind {m.get('kind')!r})", None))
        extra = None
        if stage == "seed_masks":  # the threshold comes from the sweep CSV (an input), recorded with the config
            extra = {"seed_threshold": (m.get("config") or {}).get("seed_threshold")}
        exp = want(stage, extra) if stage is not None else None
        return OutputStatus(path, rule, _str_or_none(m.get("package_version")), _str_or_none(m.get("config_hash")), exp)
    if kind == "model":
        rule, stage = MODEL_STAGES[path.parent.name]
        meta = read_checkpoint_metadata(path)
        return OutputStatus(
            path, rule, _str_or_none(meta.get("package_version")), _str_or_none(meta.get("config_hash")), want(stage)
        )
    row = read_csv_first_row(path)
    if not row:
        return OutputStatus(
            path, {"sweep": "seed_eval", "table": "summary_table"}.get(kind, "eval_masks"), None, note="no data row"
        )
    version = _str_or_none(row.get("package_version"))
    if kind == "sweep":
        return OutputStatus(path, "seed_eval", version, _str_or_none(row.get("config_hash")), want("cam"))
    if kind == "table":
        return OutputStatus(path, "summary_table", version)
    # metrics.csv: DeepLab's records its own hash; a mask evaluation the hash of its masks' folder
    if "config_hash" in row or path.parent.name == "deeplab":
        return OutputStatus(path, "eval_deeplab", version, _str_or_none(row.get("config_hash")), want("deeplab_eval"))
    m = _MASKS_HASH.search(row.get("mask_dir", "").rstrip("/\\"))
    stage = EVAL_KINDS.get(row.get("kind", ""))
    return OutputStatus(
        path, "eval_masks", version, m.group(1) if m else None, want(stage) if stage is not None else None
    )


def collect_status(
    results: str | os.PathLike,
    cfg: Optional[Mapping[str, Any]] = None,
    on_error: Optional[Callable[[Path, Exception], None]] = None,
) -> List[OutputStatus]:
    """One :class:`OutputStatus` per output under ``results`` (the top folder, ``results/``).

    ``cfg``: the validated workflow config (:func:`load_config`), or None to compare versions
    only. A file whose record cannot be read gets ``version=None`` and a note (so it is stale).
    """
    results = Path(results)
    if not results.is_dir():
        raise FileNotFoundError(f"results folder not found: {results}")
    expected = ExpectedHashes(cfg)
    out: List[OutputStatus] = []
    for path in iter_outputs(results):
        rel = path.relative_to(results)
        kind = _classify(path)
        assert kind is not None
        try:
            st = _status_of(path, rel, kind, expected)
        except Exception as e:  # a damaged or foreign file: reported, never fatal
            if on_error is not None:
                on_error(path, e)
            st = OutputStatus(path, _rule_guess(path, kind), None, note=f"unreadable: {type(e).__name__}: {e}")
        if st.version is None and not st.note:
            st.note = "records no package version"
        if st.expected_hash is None and st.config_hash is not None and cfg is not None and expected.run_of(rel) is None:
            st.note = st.note or "not a run of the config"
        out.append(st)
    return out


def _rule_guess(path: Path, kind: str) -> str:
    if kind == "model":
        return MODEL_STAGES[path.parent.name][0]
    return {"cam": "cam_shard", "marker": "?", "sweep": "seed_eval", "table": "summary_table"}.get(
        kind, "eval_deeplab" if path.parent.name == "deeplab" else "eval_masks"
    )


# ----------------------------------------------------------------------------------------------
# output


COLUMNS = ("path", "rule", "made by", "current", "config", "state")


def status_rows(statuses: Sequence[OutputStatus], relative_to: Optional[Path] = None) -> List[Tuple[str, ...]]:
    rows = []
    for s in statuses:
        p = s.path
        if relative_to is not None:
            try:
                p = p.relative_to(relative_to)
            except ValueError:
                pass
        state = "stale" if s.stale else "current"
        if s.note:
            state += f" ({s.note})"
        rows.append((str(p), s.rule, s.version or "?", s.current_version, s.config_match, state))
    return rows


def format_table(statuses: Sequence[OutputStatus], relative_to: Optional[Path] = None) -> str:
    """A plain-text table (:data:`COLUMNS`), one line per output, and a summary line."""
    rows = status_rows(statuses, relative_to)
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(COLUMNS)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = [line(COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(lines)


def summary_line(statuses: Sequence[OutputStatus]) -> str:
    stale = [s for s in statuses if s.stale]
    if not statuses:
        return "no outputs found"
    if not stale:
        return f"{len(statuses)} output(s), all made by wsss {__version__} with the current config (where known)"
    rules = sorted({s.rule for s in stale if not s.rule.startswith("?")})
    msg = f"{len(stale)} of {len(statuses)} output(s) stale"
    if rules:
        msg += f"; rules: {', '.join(rules)} (rerun them with: snakemake --cores all --forcerun {' '.join(rules)})"
    return msg
