"""Configuration: JSON-schema validation with defaults, and typed dataclasses.

``validate_config`` is called by the Snakefile before the DAG is built and by every stage, so an
unknown key, a wrong type or an unknown name fails early with a message that names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import yaml
from jsonschema import Draft202012Validator, validators

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key."""


def load_schema() -> Dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _extend_with_default(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


_DefaultingValidator = _extend_with_default(Draft202012Validator)


def _key_path(path: Iterable[Any]) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "<top level>"


def _format_error(err) -> str:
    key = _key_path(err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        valid = ", ".join(sorted(err.schema.get("properties", {})))
        where = f"under '{key}'" if err.absolute_path else "at the top level"
        return f"unknown config key(s) {', '.join(repr(e) for e in extra)} {where}; valid keys: {valid}"
    if err.validator == "enum":
        return f"config key '{key}': {err.instance!r} is not one of {err.validator_value}"
    if err.validator == "type":
        return f"config key '{key}': expected {err.validator_value}, got {type(err.instance).__name__} {err.instance!r}"
    return f"config key '{key}': {err.message}"


def validate_config(config: Mapping[str, Any], extra_checks: bool = True) -> Dict[str, Any]:
    """Validate ``config`` against the schema and return a deep copy with every default filled in.

    Raises :class:`ConfigError` listing every problem, each naming its key.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"the config must be a mapping, got {type(config).__name__}")
    cfg = copy.deepcopy(dict(config))
    validator = _DefaultingValidator(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_format_error(e) for e in errors))
    if extra_checks:
        _check_names(cfg)
    return cfg


def _check_names(cfg: Dict[str, Any]) -> None:
    """Checks the schema cannot express (names that live in registries, generator parameters)."""
    from .data import synthetic
    from .methods.base import list_methods
    from .models import list_backbones

    for where, c in [("classifier", cfg["classifier"])] + [
        (f"experiments.{n}.classifier", o.get("classifier", {})) for n, o in cfg["experiments"].items()
    ]:
        if "method" in c and c["method"] not in list_methods():
            raise ConfigError(f"config key '{where}.method': unknown method {c['method']!r}; valid: {', '.join(list_methods())}")
        if "backbone" in c and c["backbone"] not in list_backbones():
            raise ConfigError(
                f"config key '{where}.backbone': unknown backbone {c['backbone']!r}; valid: {', '.join(list_backbones())}"
            )

    from .refine.irn import IRLabelParams, IRNInferParams, IRNTrainParams

    for where, c in [("irn", cfg["irn"])] + [(f"experiments.{n}.irn", o.get("irn", {})) for n, o in cfg["experiments"].items()]:
        for sub, cls in (("ir_label", IRLabelParams), ("train", IRNTrainParams), ("infer", IRNInferParams)):
            if sub in c:
                values = dict(c[sub])
                if sub == "train" and values.get("pretrained") == "classifier":
                    values["pretrained"] = "none"  # resolved to the classifier's model file by the workflow
                try:
                    cls.from_mapping(values)
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"config key '{where}.{sub}': {e}") from None

    fs = cfg["tables"]["fully_supervised"]
    if fs is not None and fs not in cfg["experiments"]:
        raise ConfigError(f"config key 'tables.fully_supervised': {fs!r} is not an experiment; configured: {sorted(cfg['experiments'])}")

    unknown = sorted(set(cfg["synthetic"]["overrides"]) - set(synthetic.PRESETS[cfg["synthetic"]["preset"]]))
    if unknown:
        raise ConfigError(
            f"config key 'synthetic.overrides': unknown generator parameter(s) {unknown}; "
            f"valid: {sorted(synthetic.PRESETS[cfg['synthetic']['preset']])}"
        )


def config_hash(cfg: Mapping[str, Any]) -> str:
    """First 16 hex chars of the sha256 of the canonical JSON of ``cfg`` (recorded in outputs)."""
    canonical = json.dumps(cfg, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` with ``over`` merged in recursively (mappings merge, anything else replaces)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


#: Config sections that an experiment may override.
EXPERIMENT_SECTIONS = ("classifier", "cam", "seed_eval", "crf", "irn", "deeplab")
#: Sections that describe the data (part of every stage's recorded config).
DATA_SECTIONS = ("dataset", "synthetic", "voc12", "coco14")


def experiment_config(cfg: Mapping[str, Any], name: str) -> Dict[str, Any]:
    """The validated config of experiment ``name``: its overrides merged onto the base sections."""
    if name not in cfg["experiments"]:
        raise ConfigError(f"unknown experiment {name!r}; configured: {', '.join(sorted(cfg['experiments']))}")
    merged = deep_merge(cfg, cfg["experiments"][name])
    merged["experiments"] = {name: {}}
    merged["tables"] = dict(merged.get("tables", {}), fully_supervised=None)  # a workflow-level setting
    try:
        return validate_config(merged)
    except ConfigError as e:
        raise ConfigError(f"experiment {name!r}: {e}") from None


def run_names(cfg: Mapping[str, Any]) -> List[str]:
    """One run per experiment and seed: ``<experiment>/s<seed>`` (the results subfolder)."""
    return [f"{e}/s{seed}" for e in sorted(cfg["experiments"]) for seed in cfg["seeds"]]


def run_config(cfg: Mapping[str, Any], run: str) -> Dict[str, Any]:
    """The validated config of run ``<experiment>/s<seed>``: the experiment's config with the seed
    set in every stage that draws random numbers."""
    name, sep, seed_part = run.rpartition("/s")
    if not sep or not seed_part.isdigit() or int(seed_part) not in cfg["seeds"]:
        raise ConfigError(f"unknown run {run!r}; runs are <experiment>/s<seed> with seeds {cfg['seeds']}")
    seed = int(seed_part)
    out = experiment_config(cfg, name)
    out["classifier"]["seed"] = seed
    out["irn"]["train"] = dict(out["irn"]["train"], seed=seed)
    out["deeplab"]["seed"] = seed
    opts = out["classifier"]["method_options"]
    for k, v in list(opts.items()):
        if isinstance(v, str) and "{seed}" in v:
            opts[k] = v.replace("{seed}", str(seed))
    out["seeds"] = [seed]
    return out


def stage_config(cfg: Mapping[str, Any], *sections: str) -> Dict[str, Any]:
    """The part of ``cfg`` a stage depends on (data sections plus ``sections``), as recorded in its
    outputs and passed as Snakemake params (so a change there reruns the stage)."""
    return {k: copy.deepcopy(cfg[k]) for k in DATA_SECTIONS + tuple(sections)}


# --------------------------------------------------------------------------------------------
# Typed views (the schema supplies types and defaults; the dataclasses give the Python side names)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    name: str
    data_dir: str
    root: Optional[str]
    train_split: str
    eval_split: str


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    preset: str
    seed: int
    overrides: Dict[str, Any]


def section(cfg: Mapping[str, Any], name: str, cls):
    """Build dataclass ``cls`` from ``cfg[name]`` (validated), naming the section on mismatch."""
    try:
        return cls(**cfg[name])
    except TypeError as e:
        raise ConfigError(f"config section '{name}': {e}") from e


def dataset_tag(cfg: Mapping[str, Any]) -> str:
    """Folder name of the configured dataset under ``data_dir`` and ``results/``."""
    name = cfg["dataset"]["name"]
    if name == "synthetic":
        preset = cfg["synthetic"]["preset"]
        return "synthetic" if preset == "default" else f"synthetic-{preset}"
    return name


def dataset_root(cfg: Mapping[str, Any]) -> Path:
    """Folder holding the dataset in its reader's layout."""
    d = cfg["dataset"]
    if d["root"]:
        return Path(d["root"])
    base = Path(d["data_dir"])
    if d["name"] == "voc12":
        return base / "voc12" / "VOCdevkit" / "VOC2012"
    if d["name"] == "coco14":
        return base / "coco14"
    return base / dataset_tag(cfg)


def load_config_file(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    return validate_config(raw)
