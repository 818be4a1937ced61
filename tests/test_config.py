"""Config validation: defaults, unknown keys, wrong types and unknown names name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsss.config import (
    ConfigError,
    config_hash,
    experiment_config,
    load_config_file,
    run_config,
    run_names,
    stage_config,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid_and_complete():
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg = validate_config(raw)
    # config.yaml states every default of the schema (keys and values)
    assert validate_config({}) == cfg


def test_defaults_filled():
    cfg = validate_config({})
    assert cfg["dataset"]["name"] == "synthetic"
    assert cfg["cam"]["scales"] == [1.0, 0.5, 1.5, 2.0]
    assert cfg["classifier"]["momentum_mode"] == "reference"
    assert cfg["experiments"] == {"baseline": {}, "upper_bound": {"deeplab": {"pseudo_masks": "gt"}}}
    assert cfg["tables"]["fully_supervised"] == "auto"


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"datset": {}}, r"unknown config key\(s\) 'datset' at the top level"),
        ({"dataset": {"nme": "voc12"}}, r"'nme' under 'dataset'"),
        ({"dataset": {"name": "cityscapes"}}, r"'dataset.name': 'cityscapes' is not one of"),
        ({"classifier": {"lr": "fast"}}, r"'classifier.lr': expected number, got str"),
        ({"classifier": {"epochs": 2.5}}, r"'classifier.epochs': expected integer"),
        ({"cam": {"scales": []}}, r"'cam.scales'"),
        ({"classifier": {"method": "gradcam"}}, r"'classifier.method': unknown method 'gradcam'; valid: .*cam"),
        ({"classifier": {"backbone": "vgg16"}}, r"'classifier.backbone': unknown backbone 'vgg16'; valid: .*resnet50"),
        ({"experiments": {"x": {"classifier": {"backbone": "vgg"}}}}, r"experiments.x.classifier.backbone"),
        ({"experiments": {"x": {"dataset": {}}}}, r"'dataset' under 'experiments.x'"),
        ({"synthetic": {"overrides": {"num_clases": 3}}}, r"'synthetic.overrides': unknown generator parameter"),
    ],
)
def test_bad_configs_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_experiment_overrides_are_merged_and_validated():
    cfg = validate_config(
        {"experiments": {"a": {}, "b": {"classifier": {"epochs": 3, "backbone_options": {"freeze_bn": True}}}}}
    )
    b = experiment_config(cfg, "b")
    assert b["classifier"]["epochs"] == 3 and b["classifier"]["backbone_options"]["freeze_bn"] is True
    assert b["classifier"]["backbone_options"]["trainable_from"] == "stage3"  # merged, not replaced
    assert experiment_config(cfg, "a")["classifier"] == cfg["classifier"]
    bad = validate_config({"experiments": {"c": {"classifier": {"epochs": "many"}}}}, extra_checks=False)
    with pytest.raises(ConfigError, match="(?s)experiment 'c'.*classifier.epochs"):
        experiment_config(bad, "c")
    with pytest.raises(ConfigError, match="unknown experiment 'zz'"):
        experiment_config(cfg, "zz")


def test_stage_config_and_hash():
    cfg = validate_config({})
    s = stage_config(cfg, "classifier")
    assert set(s) == {"dataset", "synthetic", "voc12", "coco14", "classifier"}
    other = validate_config({"stats": {"montage_images": 3}})
    assert config_hash(stage_config(other, "classifier")) == config_hash(s)  # unrelated change
    changed = validate_config({"classifier": {"lr": 0.2}})
    assert config_hash(stage_config(changed, "classifier")) != config_hash(s)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")
    (tmp_path / "c.yaml").write_text("classifier:\n  amp: maybe\n")
    with pytest.raises(ConfigError, match="classifier.amp"):
        load_config_file(tmp_path / "c.yaml")


def test_runs_per_seed():
    opts = {"teacher_path": "x/{seed}/m.pt"}  # option names are checked against the method's
    cfg = validate_config(
        {"seeds": [0, 3], "experiments": {"a": {"classifier": {"method": "smaf", "method_options": opts}}}}
    )
    assert run_names(cfg) == ["a/s0", "a/s3"]
    r = run_config(cfg, "a/s3")
    assert r["classifier"]["seed"] == 3 and r["deeplab"]["seed"] == 3 and r["irn"]["train"]["seed"] == 3
    assert r["classifier"]["method_options"]["teacher_path"] == "x/3/m.pt"
    with pytest.raises(ConfigError, match="unknown run"):
        run_config(cfg, "a/s1")
    with pytest.raises(ConfigError, match="seeds"):
        validate_config({"seeds": [1, 1]})


# -- issue 12: names that reach a registry late, non-finite numbers, inverted ranges -------------


@pytest.mark.parametrize(
    "raw, match",
    [
        # backbones and models (registries), checked before the DAG like classifier.backbone
        (
            {"irn": {"train": {"backbone": "resnet5O"}}},
            r"config key 'irn.train.backbone': unknown backbone 'resnet5O'; valid: .*resnet50",
        ),
        (
            {"irn": {"train": {"backbone": "resnet38", "pretrained": "none"}}},
            r"config key 'irn.train.backbone': .*ResNet",
        ),
        (
            {"deeplab": {"backbone": "resnet101-os8"}},
            r"config key 'deeplab.backbone': unknown backbone 'resnet101-os8'; valid: .*resnet101_os8",
        ),
        ({"deeplab": {"backbone": "resnet18"}}, r"config key 'deeplab.backbone': .*output-stride-8 .*resnet18_os8"),
        ({"deeplab": {"model": "deeplabv3plus", "backbone": "resnet38"}}, r"config key 'deeplab.backbone': .*stride-4"),
        ({"deeplab": {"model": "deeplabv3"}}, r"config key 'deeplab.model': 'deeplabv3' is not one of"),
        ({"deeplab": {"model_options": {"ratez": [6, 12]}}}, r"config key 'deeplab.model_options': .*ratez"),
        (
            {"deeplab": {"crf_params": {"pos_wt": 3}}},
            r"unknown config key\(s\) 'pos_wt' under 'deeplab.crf_params'; valid keys: .*pos_w",
        ),
        ({"crf": {"mode": "alfa"}}, r"config key 'crf.mode': 'alfa' is not one of"),
        # backbone options and method options (unknown names used to fail in the training job)
        (
            {"classifier": {"backbone": "resnet38"}},
            r"config key 'classifier.backbone_options': .*trainable_from 'stage3'",
        ),
        (
            {"classifier": {"backbone_options": {"freez_bn": True}}},
            r"config key 'classifier.backbone_options': .*freez_bn",
        ),
        (
            {"classifier": {"method_options": {"head_lr_mul": 10}}},
            r"config key 'classifier.method_options': unknown option\(s\) \['head_lr_mul'\] of method 'cam'; valid: .*head_lr_mult",
        ),
        (
            {"classifier": {"method": "cam+islfsl", "method_options": {"islfsl": {"fls": False}}}},
            r"config key 'classifier.method_options.islfsl': unknown option\(s\) \['fls'\]",
        ),
        # pretrained weights: names, their backbones and paths
        (
            {"classifier": {"pretrained": "imagnet"}},
            r"config key 'classifier.pretrained': 'imagnet' is neither one of none, imagenet, imagenet_v2, procedural nor an existing file",
        ),
        ({"deeplab": {"pretrained": "imagenet_v2"}}, r"config key 'deeplab.pretrained': .*imagenet_v2.*'resnet18_os8'"),
        (
            {
                "classifier": {
                    "backbone": "resnet38",
                    "backbone_options": {"trainable_from": "b3"},
                    "pretrained": "imagenet",
                }
            },
            r"config key 'classifier.pretrained': .*resnet38",
        ),
        (
            {"irn": {"train": {"backbone": "resnet18", "pretrained": "classifer"}}},
            r"config key 'irn.train.pretrained': 'classifer' is neither one of none, imagenet, imagenet_v2, procedural, classifier",
        ),
        ({"deeplab": {"pretrained": "classifier"}}, r"config key 'deeplab.pretrained': 'classifier' is neither"),
        (
            {"irn": {"train": {"backbone": "resnet50", "pretrained": "classifier"}}},
            r"config key 'irn.train.backbone': .*'resnet50'.*classifier.backbone 'resnet18'",
        ),
        # synthetic generator values (not only names)
        ({"synthetic": {"overrides": {"long_side": [72, 56]}}}, r"config key 'synthetic.overrides': .*long_side"),
    ],
)
def test_late_names_fail_before_the_dag(raw, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_valid_names_and_paths_pass(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    validate_config({"classifier": {"pretrained": str(weights)}, "deeplab": {"pretrained": "imagenet"}})
    validate_config(
        {
            "classifier": {"backbone": "resnet50", "pretrained": "imagenet_v2"},
            "irn": {"train": {"backbone": "resnet50_os8", "pretrained": "classifier"}},
            "deeplab": {"model": "deeplabv3plus", "backbone": "resnet18", "model_options": {"aspp_channels": 32}},
        }
    )
    validate_config(
        {
            "classifier": {"backbone": "resnet38", "backbone_options": {"trainable_from": "b3"}},
            "irn": {"train": {"backbone": "resnet18", "pretrained": "none"}},
            "deeplab": {"backbone": "resnet38"},
        }
    )
    validate_config(
        {"classifier": {"method": "cam+islfsl", "method_options": {"head_lr_mult": 5, "islfsl": {"fsl": False}}}}
    )


def test_experiment_overrides_are_checked_before_the_dag():
    """Every experiment's merged config is checked by validate_config itself (not only by run_config)."""
    with pytest.raises(
        ConfigError, match=r"(?s)experiment 'x'.*config key 'deeplab.backbone': unknown backbone 'resnet1O1_os8'"
    ):
        validate_config({"experiments": {"base": {}, "x": {"deeplab": {"backbone": "resnet1O1_os8"}}}})
    with pytest.raises(ConfigError, match=r"(?s)experiment 'y'.*config key 'classifier.resize_long'"):
        validate_config({"experiments": {"y": {"classifier": {"resize_long": [300, 100]}}}})
    with pytest.raises(ConfigError, match=r"(?s)experiment 'z'.*config key 'irn.train.backbone'"):
        validate_config(
            {"experiments": {"z": {"classifier": {"backbone": "resnet50"}}}}
        )  # IRN keeps resnet18 from the classifier


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"classifier": {"lr": float("nan")}}, "classifier.lr"),
        ({"classifier": {"lr": float("inf")}}, "classifier.lr"),
        ({"crf": {"alpha": float("-inf")}}, "crf.alpha"),
        ({"cam": {"scales": [1.0, float("inf")]}}, "cam.scales.1"),
        ({"deeplab": {"bound_th": float("nan")}}, "deeplab.bound_th"),
        ({"classifier": {"method_options": {"head_lr_mult": float("nan")}}}, "classifier.method_options.head_lr_mult"),
        ({"irn": {"infer": {"beta": float("inf")}}}, "irn.infer.beta"),
        ({"experiments": {"a": {"deeplab": {"lr": float("nan")}}}}, "experiments.a.deeplab.lr"),
        ({"classifier": {"epochs": float("nan")}}, "classifier.epochs"),
        ({"download": {"timeout": float("inf")}}, "download.timeout"),
    ],
)
def test_non_finite_numbers_are_refused(raw, key):
    with pytest.raises(ConfigError, match=rf"config key '{key}': (nan|inf|-inf) is not a finite number"):
        validate_config(raw, extra_checks=False)


def test_non_finite_from_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("classifier:\n  lr: .nan\ncam:\n  scales: [1.0, .inf]\n")
    with pytest.raises(ConfigError, match=r"(?s)config key 'cam.scales.1': inf.*config key 'classifier.lr': nan"):
        load_config_file(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "raw, match",
    [
        (
            {"classifier": {"resize_long": [200, 10]}},
            r"config key 'classifier.resize_long': \[200, 10\] is not a range \[min, max\] with min <= max",
        ),
        ({"classifier": {"resize_long": [0, 10]}}, r"config key 'classifier.resize_long.0'"),
        ({"deeplab": {"scale_range": [0.9, 0.5]}}, r"config key 'deeplab.scale_range': \[0.9, 0.5\] is not a range"),
        ({"deeplab": {"scale_range": [0.5, 1.5]}}, r"config key 'deeplab.scale_range': .*area fraction.*<= 1"),
        ({"deeplab": {"ratio_range": [1.3, 0.75]}}, r"config key 'deeplab.ratio_range': \[1.3, 0.75\] is not a range"),
        ({"deeplab": {"ratio_range": [-1.0, 0.75]}}, r"config key 'deeplab.ratio_range.0'"),
        ({"deeplab": {"test_size": [0, 512]}}, r"config key 'deeplab.test_size.0'"),
        ({"classifier": {"color_jitter": [0.4, 0.4, 0.4, 0.6]}}, r"config key 'classifier.color_jitter': .*hue.*0.5"),
        ({"classifier": {"color_jitter": [0.4, -0.4, 0.4, 0.1]}}, r"config key 'classifier.color_jitter.1'"),
        ({"seed_eval": {"thresholds": [0.1, 0.2, 0.1]}}, r"config key 'seed_eval.thresholds'"),
        ({"seed_eval": {"thresholds": [0.1, 1.2]}}, r"config key 'seed_eval.thresholds.1'"),
        ({"irn": {"train": {"rescale": [1.5, 0.5]}}}, r"config key 'irn.train.rescale': \[1.5, 0.5\] is not a range"),
        (
            {"irn": {"ir_label": {"fg_thresh": 0.05, "bg_thresh": 0.3}}},
            r"config key 'irn.ir_label.bg_thresh': 0.3 must not exceed irn.ir_label.fg_thresh",
        ),
    ],
)
def test_inverted_or_invalid_ranges_are_refused(raw, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_example_configs_validate():
    """config.yaml, and configs/*.yaml and tests/configs/*.yaml on top of it as the Snakefile reads
    them (with every experiment and run), pass."""
    from wsss.config import deep_merge

    base = yaml.safe_load((REPO / "config.yaml").read_text())
    files = [
        *sorted((REPO / "configs").glob("*.yaml")),
        *sorted((REPO / "tests" / "configs").glob("*.yaml")),
    ]
    assert len(files) >= 5
    load_config_file(REPO / "config.yaml")
    for f in files:
        cfg = validate_config(deep_merge(base, yaml.safe_load(f.read_text())))
        for run in run_names(cfg):
            run_config(cfg, run)


def test_schema_enums_match_the_code():
    """Names the schema lists as an enum are the ones the stages accept (so the schema cannot drift)."""
    from wsss.refine import crf
    from wsss.seg import params as seg_params
    from wsss.seg.models import list_seg_models

    props = yaml.safe_load((REPO / "wsss" / "schemas" / "config.schema.yaml").read_text())["properties"]
    assert sorted(props["crf"]["properties"]["mode"]["enum"]) == sorted(crf.MODES)
    # keyword options typed in the schema = the functions' keyword arguments
    import inspect

    def kwargs(fn, skip):
        return sorted(n for n in inspect.signature(fn).parameters if n not in skip)

    assert sorted(props["deeplab"]["properties"]["crf_params"]["properties"]) == kwargs(
        crf.deeplab_crf, ("img", "probs")
    )
    ir_crf = props["irn"]["properties"]["ir_label"]["properties"]["crf"]["properties"]
    assert sorted(ir_crf) == kwargs(crf.crf_inference_label, ("img", "labels", "n_labels"))
    from wsss.cam_infer import UPSAMPLE_AUTO, UPSAMPLES

    assert sorted(props["cam"]["properties"]["upsample"]["enum"]) == sorted(UPSAMPLES + (UPSAMPLE_AUTO,))
    dl = props["deeplab"]["properties"]
    assert sorted(dl["model"]["enum"]) == list_seg_models()
    for key, names in [
        ("pseudo_masks", seg_params.PSEUDO_MASK_SOURCES),
        ("ce_normalisation", seg_params.CE_NORMALISATIONS),
        ("param_groups", seg_params.PARAM_GROUPS),
        ("fusion", seg_params.FUSIONS),
        ("crf_image", seg_params.CRF_IMAGES),
        ("augment", seg_params.AUGMENTS),
    ]:
        assert sorted(dl[key]["enum"]) == sorted(names), key


def test_fully_supervised_experiment():
    """tables.fully_supervised: auto finds the one ground-truth experiment; a name must be one."""
    from wsss.config import fully_supervised_experiment

    assert fully_supervised_experiment(validate_config({})) == "upper_bound"
    assert fully_supervised_experiment(validate_config({"experiments": {"baseline": {}}})) is None
    gt = {"deeplab": {"pseudo_masks": "gt"}}
    named = validate_config({"experiments": {"full": gt}, "tables": {"fully_supervised": "full"}})
    assert fully_supervised_experiment(named) == "full"
    assert fully_supervised_experiment(validate_config({"tables": {"fully_supervised": None}})) is None
    for raw, match in [
        (
            {"experiments": {"upper_bound": gt, "full": gt}},
            r"auto finds several experiments trained on ground truth \(full, upper_bound\)",
        ),
        ({"tables": {"fully_supervised": "nope"}}, r"'nope' is not an experiment; experiments: baseline, upper_bound"),
        (
            {"tables": {"fully_supervised": "baseline"}},
            r"experiment 'baseline' trains DeepLab on 'irn', not on ground truth",
        ),
    ]:
        with pytest.raises(ConfigError, match=match):
            validate_config(raw)
