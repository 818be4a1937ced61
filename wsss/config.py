"""Configuration: JSON-schema validation with defaults, and typed dataclasses.

``validate_config`` is called by the Snakefile before the DAG is built and by every stage, so an
unknown key, a wrong type or an unknown name fails early with a message that names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import yaml
from jsonschema import Draft202012Validator, validators

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key."""


def load_schema() -> Dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


@functools.lru_cache(maxsize=1)
def _validator():
    # the defaulting validator deep-copies defaults into the instance, so the schema is never mutated
    return _DefaultingValidator(load_schema())


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


def _format_error(err, prefix: Iterable[Any] = ()) -> str:
    path = list(prefix) + list(err.absolute_path)
    key = _key_path(path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        valid = ", ".join(sorted(err.schema.get("properties", {})))
        where = f"under '{key}'" if path else "at the top level"
        return f"unknown config key(s) {', '.join(repr(e) for e in extra)} {where}; valid keys: {valid}"
    if err.validator == "enum":
        return f"config key '{key}': {err.instance!r} is not one of {err.validator_value}"
    if err.validator == "type":
        return f"config key '{key}': expected {err.validator_value}, got {type(err.instance).__name__} {err.instance!r}"
    return f"config key '{key}': {err.message}"


def validate_config(config: Mapping[str, Any], extra_checks: bool = True) -> Dict[str, Any]:
    """Validate ``config`` against the schema and return a deep copy with every default filled in.

    Raises :class:`ConfigError` listing every problem, each naming its key: schema errors, NaN or
    infinite numbers anywhere in the config, and inverted ``[min, max]`` ranges. ``extra_checks``
    adds the checks the schema cannot express (names that live in registries, option names,
    pretrained weights, and the merged config of every experiment); they import torch, so the
    Snakefile validates with ``extra_checks=False`` and runs them in a child process
    (:mod:`wsss.workflow.config_check`).
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"the config must be a mapping, got {type(config).__name__}")
    cfg = copy.deepcopy(dict(config))
    # an experiment set to null is dropped, so that a later config file can remove one of an
    # earlier file's (configs/papers/*.yaml remove config.yaml's baseline: `baseline: null`)
    if isinstance(cfg.get("experiments"), Mapping):
        cfg["experiments"] = {k: v for k, v in cfg["experiments"].items() if v is not None}
    problems = [
        (
            _key_path(path),
            f"config key '{_key_path(path)}': {v!r} is not a finite number (NaN and infinities are not allowed)",
        )
        for path, v in _non_finite(cfg, [])
    ]
    errors = sorted(_validator().iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    problems += [(_key_path(e.absolute_path), _format_error(e)) for e in errors]
    if not errors:
        problems += _range_problems(cfg) + _tables_problems(cfg)
    if problems:
        problems.sort(key=lambda p: p[0])
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(msg for _, msg in problems))
    if extra_checks:
        _check_names(cfg)
    return cfg


def _non_finite(value: Any, path: List[Any]) -> Iterable[tuple]:
    """``(path, value)`` of every NaN or infinite float in ``value`` (YAML ``.nan``/``.inf``,
    ``--config key=nan``): JSON schema's ``type: number`` and its bounds let them through."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _non_finite(v, path + [k])
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _non_finite(v, path + [i])


def _deeplab_target(cfg: Mapping[str, Any], experiment: str) -> str:
    """``deeplab.pseudo_masks`` of ``experiment`` (its override, else the base section's)."""
    return (cfg["experiments"][experiment].get("deeplab") or {}).get("pseudo_masks", cfg["deeplab"]["pseudo_masks"])


def fully_supervised_experiment(cfg: Mapping[str, Any]) -> Optional[str]:
    """The experiment ``tables.fully_supervised`` names (``auto``: the one whose DeepLab trains on
    ground truth, ``None`` if there is none), or ``None``; raises :class:`ConfigError` for a name
    that is not an experiment trained on ground truth, or ``auto`` with several."""
    name = cfg["tables"]["fully_supervised"]
    key = "tables.fully_supervised"
    if name is None:
        return None
    if name == "auto":
        gt = sorted(e for e in cfg["experiments"] if _deeplab_target(cfg, e) == "gt")
        if len(gt) > 1:
            raise ConfigError(
                f"config key '{key}': auto finds several experiments trained on ground truth ({', '.join(gt)}); name one"
            )
        return gt[0] if gt else None
    if name not in cfg["experiments"]:
        raise ConfigError(
            f"config key '{key}': {name!r} is not an experiment; experiments: {', '.join(sorted(cfg['experiments']))}"
        )
    if _deeplab_target(cfg, name) != "gt":
        raise ConfigError(
            f"config key '{key}': experiment {name!r} trains DeepLab on {_deeplab_target(cfg, name)!r}, not on ground truth (deeplab.pseudo_masks: gt)"
        )
    return name


def _tables_problems(cfg: Mapping[str, Any]) -> List[tuple]:
    try:
        fully_supervised_experiment(cfg)
    except ConfigError as e:
        return [("tables.fully_supervised", str(e))]
    return []


#: Two-element ``[min, max]`` ranges of the schema (lower bounds of the items are in the schema).
RANGE_KEYS = (
    ("classifier", "resize_long"),
    ("deeplab", "scale_range"),
    ("deeplab", "ratio_range"),
    ("irn.train", "rescale"),
)
#: Sections (dotted keys) with value relations the schema cannot express (:func:`_section_problems`).
RELATION_SECTIONS = ("classifier", "deeplab", "irn.ir_label", "irn.train")


def _section_problems(sec: str, s: Mapping[str, Any]) -> List[tuple]:
    """Inverted ranges and value relations the schema cannot express in section ``sec`` (dotted
    key; ``s`` is schema-valid, defaults filled)."""
    out = []

    def bad(key: str, msg: str) -> None:
        out.append((key, f"config key '{key}': {msg}"))

    for where, name in RANGE_KEYS:
        if where == sec and s[name][0] > s[name][1]:
            bad(f"{sec}.{name}", f"{s[name]!r} is not a range [min, max] with min <= max")
    if sec == "deeplab" and s["augment"] == "resized_crop" and s["scale_range"][1] > 1:
        bad(
            "deeplab.scale_range",
            f"{s['scale_range']!r}: with augment 'resized_crop' it is an area fraction, so max must be <= 1",
        )
    if sec == "classifier" and s["color_jitter"] is not None and s["color_jitter"][3] > 0.5:
        bad("classifier.color_jitter", f"{s['color_jitter']!r}: the hue strength (4th value) must be <= 0.5")
    if sec == "irn.ir_label" and s["bg_thresh"] > s["fg_thresh"]:
        bad("irn.ir_label.bg_thresh", f"{s['bg_thresh']!r} must not exceed irn.ir_label.fg_thresh ({s['fg_thresh']!r})")
    return out


def _range_problems(cfg: Mapping[str, Any]) -> List[tuple]:
    """Inverted ranges and value relations the schema cannot express (the config is schema-valid)."""
    return [p for sec in RELATION_SECTIONS for p in _section_problems(sec, _get(cfg, sec))]


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@functools.lru_cache(maxsize=None)
def _section_validator(key: str):
    schema = load_schema()
    for part in key.split("."):
        sub = schema.get("properties", {})
        if part not in sub or sub[part].get("type") != "object" or "properties" not in sub[part]:
            raise ConfigError(f"{key!r} is not a config section with typed keys")
        schema = sub[part]
    return _DefaultingValidator(schema)


def validate_section(key: str, values: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Section ``key`` of the config (dotted, e.g. ``"irn.train"``, ``"deeplab"``, ``"crf"``):
    ``values`` checked against that part of the schema (and the relations
    :func:`validate_config` checks there) and returned as a deep copy with every missing key
    filled in with its schema default. For library functions and tests that run without a
    workflow config; the defaults live in the schema only. Raises :class:`ConfigError` naming the
    key. Cheap and torch-free.
    """
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"config key '{key}': expected a mapping, got {type(values).__name__} {values!r}")
    validator = _section_validator(key)
    prefix = key.split(".")
    s = copy.deepcopy(dict(values or {}))
    problems = [
        (
            _key_path(prefix + path),
            f"config key '{_key_path(prefix + path)}': {v!r} is not a finite number (NaN and infinities are not allowed)",
        )
        for path, v in _non_finite(s, [])
    ]
    errors = sorted(validator.iter_errors(s), key=lambda e: list(map(str, e.absolute_path)))
    problems += [(_key_path(prefix + list(e.absolute_path)), _format_error(e, prefix)) for e in errors]
    if not errors and key in RELATION_SECTIONS:
        problems += _section_problems(key, s)
    if problems:
        problems.sort(key=lambda p: p[0])
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(msg for _, msg in problems))
    return s


def section_defaults(key: str) -> Dict[str, Any]:
    """Section ``key`` (dotted) with every key at its schema default (see :func:`validate_section`)."""
    return validate_section(key, {})


def _check_names(cfg: Dict[str, Any]) -> None:
    """Checks the schema cannot express (names that live in registries, option names, pretrained
    weights, generator parameters), then the merged config of every experiment."""
    from .data import synthetic
    from .methods import list_methods
    from .models import list_backbones

    for where, c in [("classifier", cfg["classifier"])] + [
        (f"experiments.{n}.classifier", o.get("classifier", {})) for n, o in cfg["experiments"].items()
    ]:
        if "method" in c and c["method"] not in list_methods():
            raise ConfigError(
                f"config key '{where}.method': unknown method {c['method']!r}; valid: {', '.join(list_methods())}"
            )
        if "backbone" in c and c["backbone"] not in list_backbones():
            raise ConfigError(
                f"config key '{where}.backbone': unknown backbone {c['backbone']!r}; valid: {', '.join(list_backbones())}"
            )

    from .refine.affinitynet_params import AffinityInferParams, AffinityLabelParams, AffinityTrainParams

    for where, c in [("affinitynet", cfg["affinitynet"])] + [
        (f"experiments.{n}.affinitynet", o.get("affinitynet", {})) for n, o in cfg["experiments"].items()
    ]:
        for sub, cls in (
            ("label", AffinityLabelParams),
            ("train", AffinityTrainParams),
            ("infer", AffinityInferParams),
        ):
            if isinstance(c.get(sub), Mapping):
                try:
                    cls.from_mapping(c[sub])
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"config key '{where}.{sub}': {e}") from None

    unknown = sorted(set(cfg["synthetic"]["overrides"]) - set(synthetic.PRESETS[cfg["synthetic"]["preset"]]))
    if unknown:
        raise ConfigError(
            f"config key 'synthetic.overrides': unknown generator parameter(s) {unknown}; "
            f"valid: {sorted(synthetic.PRESETS[cfg['synthetic']['preset']])}"
        )
    try:
        synthetic.resolve_params(cfg["synthetic"]["preset"], **cfg["synthetic"]["overrides"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'synthetic.overrides': {e}") from None

    _check_classifier(cfg["classifier"])
    _check_irn_backbone(cfg["irn"]["train"], cfg["classifier"])
    _check_affinitynet_backbone(cfg["affinitynet"]["train"], cfg["classifier"])
    _check_deeplab(cfg["deeplab"])

    # every experiment's merged config (the Snakefile builds each run's config before the DAG too;
    # this makes validate_config alone enough). Merged configs list only their own experiment.
    for name, overrides in cfg["experiments"].items():
        if overrides:
            experiment_config(cfg, name)


# --------------------------------------------------------------------------------------------
# registry names, option names and pretrained weights (checked on the base sections; experiments
# through their merged config)

#: Pretrained-weight names every backbone section accepts besides a path to a state_dict file.
PRETRAINED_NAMES = ("none", "imagenet", "imagenet_v2", "procedural")


def _option_names(fn, skip: Iterable[str]) -> Optional[List[str]]:
    """Keyword names ``fn`` accepts (minus ``skip``); ``None`` when it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return sorted(p.name for p in params if p.name not in set(skip) and p.kind is not inspect.Parameter.VAR_POSITIONAL)


def _check_option_names(key: str, options: Mapping[str, Any], valid: Optional[List[str]], what: str = "") -> None:
    if valid is None:
        return
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"config key '{key}': unknown option(s) {unknown}{what}; valid: {', '.join(valid)}")


def _cache_key(options: Mapping[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=repr)


def _meta_build(build):
    """Run ``build()`` on PyTorch's meta device (no memory, no weights): the constructor's own
    checks of names, options and shapes run, nothing is computed."""
    import torch

    with torch.device("meta"):
        return build()


@functools.lru_cache(maxsize=64)
def _backbone_summary(name: str, options_json: str) -> Dict[str, Any]:
    """Type, taps and parameter shapes of backbone ``name`` built with ``options`` (cached)."""
    from .models.backbones import BACKBONES, ResNet

    kwargs = json.loads(options_json)
    if "trainable_from" in kwargs and kwargs["trainable_from"] is None:
        kwargs["trainable_from"] = "all"  # as build_backbone
    bb = _meta_build(lambda: BACKBONES.build(name, **kwargs))
    return {
        "resnet": isinstance(bb, ResNet),
        "tap_strides": dict(bb.tap_strides),
        "output_stride": bb.output_stride,
        "shapes": {k: tuple(v.shape) for k, v in bb.state_dict().items()},
    }


def _check_pretrained(key: str, spec: Any, backbone: str, also: tuple = ()) -> None:
    """``spec`` is ``none``, an ImageNet weights name that exists for ``backbone``, one of ``also``,
    or an existing file (a typo such as 'imagnet' used to fail in the job as a missing path)."""
    from .models import weights
    from .pretrain import PROCEDURAL_SPEC, base_arch

    if spec in ("none", PROCEDURAL_SPEC) or spec in also:
        return  # the workflow makes the procedural weights before the job that reads them

    if spec in weights.IMAGENET_SPECS:
        base = base_arch(backbone)
        if base not in weights.TORCHVISION_WEIGHTS:
            raise ConfigError(
                f"config key '{key}': no downloadable ImageNet weights for backbone {backbone!r} (torchvision weights exist "
                f"for {', '.join(sorted(weights.TORCHVISION_WEIGHTS))}; resnet38: docs/resnet38_weights.md); "
                "use 'none' or the path of a state_dict file"
            )
        import torchvision.models

        enum_cls = getattr(torchvision.models, weights.TORCHVISION_WEIGHTS[base])
        tag = weights.IMAGENET_SPECS[spec]
        if tag not in enum_cls.__members__:
            have = ", ".join(n for n, t in weights.IMAGENET_SPECS.items() if t in enum_cls.__members__)
            raise ConfigError(
                f"config key '{key}': torchvision has no {spec} ({tag}) weights for backbone {backbone!r}; valid: {have}"
            )
        return
    if not isinstance(spec, str) or not Path(spec).expanduser().is_file():
        valid = ", ".join(PRETRAINED_NAMES + tuple(also))
        raise ConfigError(f"config key '{key}': {spec!r} is neither one of {valid} nor an existing file (a state_dict)")


def _check_classifier(c: Mapping[str, Any]) -> None:
    from .methods import ISLFSL_SUFFIX, METHODS, load_builtin_methods

    load_builtin_methods()
    opts = dict(c["method_options"])
    base = c["method"][: -len(ISLFSL_SUFFIX)] if c["method"].endswith(ISLFSL_SUFFIX) else c["method"]
    if c["method"].endswith(ISLFSL_SUFFIX):
        from .methods.islfsl import ISLFSL

        isl = opts.pop("islfsl", None) or {}
        if not isinstance(isl, Mapping):
            raise ConfigError(
                f"config key 'classifier.method_options.islfsl': expected a mapping of ISL/FSL options, got {isl!r}"
            )
        _check_option_names(
            "classifier.method_options.islfsl",
            isl,
            _option_names(ISLFSL.__init__, ("self", "base")),
            " of the ISL/FSL add-on",
        )
    _check_option_names(
        "classifier.method_options",
        opts,
        _option_names(METHODS.get(base), ("num_classes", "backbone")),
        f" of method {base!r}",
    )

    try:
        _backbone_summary(c["backbone"], _cache_key(c["backbone_options"]))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'classifier.backbone_options': {e} (backbone {c['backbone']!r})") from None
    _check_pretrained("classifier.pretrained", c["pretrained"], c["backbone"])


def _check_irn_backbone(train: Mapping[str, Any], classifier: Mapping[str, Any]) -> None:
    from .models import list_backbones

    name = train["backbone"]
    if name not in list_backbones():
        raise ConfigError(
            f"config key 'irn.train.backbone': unknown backbone {name!r}; valid: {', '.join(list_backbones())}"
        )
    summary = _backbone_summary(name, "{}")
    st = summary["tap_strides"]
    if not summary["resnet"] or st.get("stage1") != 4 or st.get("stage2") != 8:
        valid = [b for b in list_backbones() if _backbone_summary(b, "{}")["resnet"]]
        raise ConfigError(
            f"config key 'irn.train.backbone': IRN needs a ResNet backbone, got {name!r}; valid: {', '.join(valid)}"
        )
    pretrained = train["pretrained"]
    _check_pretrained("irn.train.pretrained", pretrained, name, also=("classifier",))
    if pretrained == "classifier":
        # the workflow loads the classifier's trained backbone into the IRN backbone
        own = summary["shapes"]
        src = _backbone_summary(classifier["backbone"], "{}")["shapes"]
        common = set(own) & set(src)
        misfit = sorted(k for k in common if own[k] != src[k])
        if not common or misfit:
            why = f"{len(misfit)} tensors differ in shape (e.g. {misfit[0]})" if misfit else "no parameter names match"
            raise ConfigError(
                f"config key 'irn.train.backbone': {name!r} cannot start from classifier.backbone {classifier['backbone']!r} "
                f"(irn.train.pretrained: classifier): {why}; use the classifier's backbone family or another irn.train.pretrained"
            )


def _check_affinitynet_backbone(train: Mapping[str, Any], classifier: Mapping[str, Any]) -> None:
    from .models import list_backbones

    name = train["backbone"]
    if name not in list_backbones():
        raise ConfigError(
            f"config key 'affinitynet.train.backbone': unknown backbone {name!r}; valid: {', '.join(list_backbones())}"
        )
    _check_pretrained("affinitynet.train.pretrained", train["pretrained"], name, also=("classifier",))
    if train["pretrained"] == "classifier":
        # the workflow loads the classifier's trained backbone into the AffinityNet backbone
        own = _backbone_summary(name, "{}")["shapes"]
        src = _backbone_summary(classifier["backbone"], "{}")["shapes"]
        common = set(own) & set(src)
        misfit = sorted(k for k in common if own[k] != src[k])
        if not common or misfit:
            why = f"{len(misfit)} tensors differ in shape (e.g. {misfit[0]})" if misfit else "no parameter names match"
            raise ConfigError(
                f"config key 'affinitynet.train.backbone': {name!r} cannot start from classifier.backbone {classifier['backbone']!r} "
                f"(affinitynet.train.pretrained: classifier): {why}; use the classifier's backbone family or another pretrained"
            )


def _check_deeplab(d: Mapping[str, Any]) -> None:
    from .models import list_backbones
    from .seg.models import list_seg_models

    if d["model"] not in list_seg_models():
        raise ConfigError(
            f"config key 'deeplab.model': unknown model {d['model']!r}; valid: {', '.join(list_seg_models())}"
        )
    if d["backbone"] not in list_backbones():
        raise ConfigError(
            f"config key 'deeplab.backbone': unknown backbone {d['backbone']!r}; valid: {', '.join(list_backbones())}"
        )
    problem = _seg_model_problem(d["model"], d["backbone"], d["freeze_bn"], _cache_key(d["model_options"]))
    if problem:
        if _seg_model_problem(d["model"], d["backbone"], d["freeze_bn"], "{}"):
            raise ConfigError(f"config key 'deeplab.backbone': {problem}")
        raise ConfigError(f"config key 'deeplab.model_options': {problem}")
    _check_pretrained("deeplab.pretrained", d["pretrained"], d["backbone"])
    # deeplab.crf_params: its keys are typed in the schema (tests/test_config.py checks them against deeplab_crf)


@functools.lru_cache(maxsize=64)
def _seg_model_problem(model: str, backbone: str, freeze_bn: bool, options_json: str) -> Optional[str]:
    """Why the segmentation model cannot be built (on the meta device), or ``None``."""
    from .seg.models import SEG_MODELS

    options = json.loads(options_json)
    try:
        _meta_build(
            lambda: SEG_MODELS.build(
                model, num_classes=2, backbone=backbone, pretrained="none", freeze_bn=freeze_bn, **options
            )
        )
    except (TypeError, ValueError, KeyError) as e:
        return f"{model} with backbone {backbone!r}: {e.args[0] if e.args else e}"
    return None


def config_hash(cfg: Mapping[str, Any]) -> str:
    """First 16 hex chars of the sha256 of the canonical JSON of ``cfg`` (recorded in outputs)."""
    canonical = json.dumps(cfg, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` with ``over`` merged in recursively (mappings merge, anything else replaces)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
        )
    return out


#: Config sections that an experiment may override.
EXPERIMENT_SECTIONS = ("classifier", "cam", "seed_eval", "crf", "irn", "affinitynet", "deeplab")
#: Sections that describe the data (part of every stage's recorded config).
DATA_SECTIONS = ("dataset", "synthetic", "voc12", "coco14")


def experiment_config(cfg: Mapping[str, Any], name: str, extra_checks: bool = True) -> Dict[str, Any]:
    """The validated config of experiment ``name``: its overrides merged onto the base sections
    (``extra_checks``: as in :func:`validate_config`)."""
    if name not in cfg["experiments"]:
        raise ConfigError(f"unknown experiment {name!r}; configured: {', '.join(sorted(cfg['experiments']))}")
    merged = deep_merge(cfg, cfg["experiments"][name])
    merged["experiments"] = {name: {}}
    merged["tables"] = dict(merged.get("tables", {}), fully_supervised=None)  # a workflow-level setting
    try:
        return validate_config(merged, extra_checks=extra_checks)
    except ConfigError as e:
        raise ConfigError(f"experiment {name!r}: {e}") from None


def run_names(cfg: Mapping[str, Any]) -> List[str]:
    """One run per experiment and seed: ``<experiment>/s<seed>`` (the results subfolder)."""
    return [f"{e}/s{seed}" for e in sorted(cfg["experiments"]) for seed in cfg["seeds"]]


def run_config(cfg: Mapping[str, Any], run: str, extra_checks: bool = True) -> Dict[str, Any]:
    """The validated config of run ``<experiment>/s<seed>``: the experiment's config with the seed
    set in every stage that draws random numbers (``extra_checks``: as in :func:`validate_config`)."""
    name, sep, seed_part = run.rpartition("/s")
    if not sep or not seed_part.isdigit() or int(seed_part) not in cfg["seeds"]:
        raise ConfigError(f"unknown run {run!r}; runs are <experiment>/s<seed> with seeds {cfg['seeds']}")
    seed = int(seed_part)
    out = experiment_config(cfg, name, extra_checks=extra_checks)
    out["classifier"]["seed"] = seed
    out["irn"]["train"] = dict(out["irn"]["train"], seed=seed)
    out["affinitynet"]["train"] = dict(out["affinitynet"]["train"], seed=seed)
    out["deeplab"]["seed"] = seed
    # placeholders in string method options (a SMAF teacher_path names another run's model.pt):
    # {seed} = this run's seed, {dataset} = the results folder's dataset tag (results/{dataset}/)
    opts = out["classifier"]["method_options"]
    for k, v in list(opts.items()):
        if isinstance(v, str) and ("{seed}" in v or "{dataset}" in v):
            opts[k] = v.replace("{seed}", str(seed)).replace("{dataset}", dataset_tag(out))
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


def saliency_dir(cfg: Mapping[str, Any]) -> Path:
    """Folder of the saliency maps (``<id>.png``) of the methods that train on them:
    ``saliency.root``, else ``<dataset root>/SALImages`` (synthetic: generated; voc12: downloaded)."""
    root = (cfg.get("saliency") or {}).get("root")
    return Path(root) if root else dataset_root(cfg) / "SALImages"


def load_config_file(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    return validate_config(raw)
