"""Config validation: defaults, unknown keys, wrong types and unknown names name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsss.config import ConfigError, config_hash, experiment_config, load_config_file, run_config, run_names, stage_config, validate_config

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
    assert cfg["experiments"] == {"baseline": {}}


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
    cfg = validate_config({"experiments": {"a": {}, "b": {"classifier": {"epochs": 3, "backbone_options": {"freeze_bn": True}}}}})
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
    cfg = validate_config({"seeds": [0, 3], "experiments": {"a": {"classifier": {"method_options": {"p": "x/{seed}/m.pt"}}}}})
    assert run_names(cfg) == ["a/s0", "a/s3"]
    r = run_config(cfg, "a/s3")
    assert r["classifier"]["seed"] == 3 and r["deeplab"]["seed"] == 3 and r["irn"]["train"]["seed"] == 3
    assert r["classifier"]["method_options"]["p"] == "x/3/m.pt"
    with pytest.raises(ConfigError, match="unknown run"):
        run_config(cfg, "a/s1")
    with pytest.raises(ConfigError, match="seeds"):
        validate_config({"seeds": [1, 1]})
