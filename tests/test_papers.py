"""Paper presets (configs/papers/*.yaml): each builds its VOC DAG, holds the paper's key settings,
and runs end to end on the tiny synthetic data (tests/configs/papers_tiny.yaml); plus the
DeepLab-v1 network HFPL/AEFT/ACR segment with (wsss.seg.models.deeplabv1)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_workflow import job_counts, snakemake

from wsss.config import deep_merge, run_config, validate_config

REPO = Path(__file__).resolve().parents[1]
PAPERS = REPO / "configs" / "papers"
TINY = REPO / "tests" / "configs" / "papers_tiny.yaml"
PRESETS = ["irn", "aeft", "acr", "hfpl", "smaf", "ktse"]
#: the experiment of each preset whose DeepLab is the paper's result (smaf also trains its eps teacher)
EXPERIMENT = {p: p for p in PRESETS}
#: what only sizes a preset's method for the tiny crops (ACR's U-Net depth must divide the crop)
TINY_EXTRA = {
    "acr": {"classifier": {"method_options": {"unet_depth": 6, "unet_width": 16, "recon_dims": [16, 32, 64]}}},
    # AEFT's model selection starts at step 1600; the tiny run has 2 AffinityNet steps
    "aeft": {
        "affinitynet": {"train": {"select": {"from_step": 1, "every": 1, "split": "train", "eval_mode_after": True}}}
    },
}


def preset_config(name: str, *more: dict) -> dict:
    """config.yaml + the preset (+ more), merged as snakemake merges --configfile files, validated."""
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    for over in (yaml.safe_load((PAPERS / f"{name}.yaml").read_text()),) + more:
        raw = deep_merge(raw, over)
    return validate_config(raw, extra_checks=False)


def test_every_preset_file_is_tested():
    assert sorted(p.stem for p in PAPERS.glob("*.yaml")) == sorted(PRESETS)


# ----------------------------------------------------------------------------------------------
# the papers' key settings


def test_presets_hold_the_papers_settings():
    cfg = {p: run_config(preset_config(p), f"{EXPERIMENT[p]}/s0", extra_checks=False) for p in PRESETS}
    for p, c in cfg.items():
        assert c["dataset"]["name"] == "voc12" and c["dataset"]["train_split"] == "train_aug", p
        assert c["dataset"]["eval_split"] == "val" and c["voc12"]["mask_dir"] == "SegmentationClassAug", p
        assert list(preset_config(p)["experiments"]) == (["eps", "smaf"] if p == "smaf" else [p]), p
        assert c["cam"]["scales"] == [1.0, 0.5, 1.5, 2.0] and c["cam"]["flip"], p
        if p != "irn":
            assert c["classifier"]["backbone"] == "resnet38" and c["classifier"]["momentum_mode"] == "reference", p

    irn = cfg["irn"]
    assert irn["classifier"]["method"] == "cam" and irn["classifier"]["backbone"] == "resnet50"
    assert irn["irn"]["ir_label"] == {"fg_thresh": 0.30, "bg_thresh": 0.05, "crf": {}}
    assert irn["irn"]["infer"]["beta"] == 10 and irn["irn"]["infer"]["exp_times"] == 8
    assert irn["deeplab"]["model"] == "deeplabv2" and irn["deeplab"]["backbone"] == "resnet50_os8"
    assert irn["deeplab"]["pseudo_masks"] == "irn"

    aeft = cfg["aeft"]
    assert aeft["classifier"]["method"] == "aeft" and aeft["classifier"]["color_jitter"] == [0.4, 0.4, 0.4, 0.1]
    assert aeft["classifier"]["backbone_options"]["dropout"] == [0.2, 0.2]
    assert aeft["classifier"]["epochs"] == 40 and aeft["classifier"]["batch_size"] == 32
    assert aeft["cam"]["normalisation"] == "max" and aeft["crf"]["alpha"] == 9
    assert aeft["affinitynet"]["label"]["low_alpha"] == 2 and aeft["affinitynet"]["label"]["high_alpha"] == 21
    a = aeft["affinitynet"]["infer"]
    assert (a["alpha"], a["beta"], a["logt"], a["crf_t"]) == (19, 8, 6, 1)
    assert aeft["affinitynet"]["train"]["pretrained"] == "classifier" and aeft["affinitynet"]["train"]["lr"] == 0.01
    assert aeft["deeplab"]["model"] == "deeplabv1" and aeft["deeplab"]["pseudo_masks"] == "affinitynet"

    acr = cfg["acr"]
    assert acr["classifier"]["method"] == "acr" and acr["classifier"]["backbone_options"]["trainable_from"] is None
    assert acr["classifier"]["crop_size"] == 256 and acr["cam"]["normalisation"] == "minmax"
    assert acr["deeplab"]["model"] == "deeplabv1" and acr["deeplab"]["pseudo_masks"] == "irn"
    assert acr["deeplab"]["lr"] == 0.001

    hfpl = cfg["hfpl"]
    assert hfpl["classifier"]["method"] == "seam+islfsl" and hfpl["classifier"]["epochs"] == 8
    assert hfpl["classifier"]["color_jitter"] == [0.3, 0.3, 0.3, 0.1] and hfpl["classifier"]["color_jitter_p"] == 1.0
    assert hfpl["cam"]["normalisation"] == "minmax"
    assert hfpl["affinitynet"]["label"]["low_alpha"] == 1 and hfpl["affinitynet"]["label"]["high_alpha"] == 24
    h = hfpl["affinitynet"]["infer"]
    assert (h["alpha"], h["beta"], h["logt"], h["crf_t"]) == (6, 8, 6, 0)
    assert hfpl["affinitynet"]["train"]["pretrained"] == "weights/resnet38_a1.pth"
    d = hfpl["deeplab"]
    assert d["model"] == "deeplabv1" and d["backbone"] == "resnet38" and d["pseudo_masks"] == "affinitynet"
    assert (d["lr"], d["head_lr_mult"], d["batch_size"], d["crop_size"], d["augment"]) == (
        0.001,
        10.0,
        10,
        448,
        "scale_crop",
    )
    assert d["test_scales"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and d["flip"] and d["crf"]
    assert d["crf_params"] == {"t": 1, "pos_w": 3, "pos_xy_std": 3, "bi_w": 10, "bi_xy_std": 32, "bi_rgb_std": 13}

    smaf = cfg["smaf"]
    opts = smaf["classifier"]["method_options"]
    assert smaf["classifier"]["method"] == "smaf" and opts["cls_weight"] == 0
    assert opts["teacher_path"] == "results/voc12/eps/s0/classifier/model.pt"
    assert run_config(preset_config("smaf"), "eps/s0", extra_checks=False)["classifier"]["method"] == "eps"
    assert smaf["crf"]["mode"] == "threshold" and smaf["crf"]["bg_threshold"] == 0.2
    assert smaf["seed_eval"]["thresholds"] == [0.2]
    assert smaf["deeplab"]["pseudo_masks"] == "crf" and smaf["deeplab"]["backbone"] == "resnet101_os8"

    ktse = cfg["ktse"]
    assert ktse["classifier"]["method"] == "ktse" and ktse["classifier"]["batch_size"] == 16
    assert ktse["irn"]["ir_label"]["bg_thresh"] == 0.10 and ktse["irn"]["infer"]["confidence_ratio"] == 0.5
    d = ktse["deeplab"]
    assert d["model"] == "deeplabv2" and d["backbone"] == "resnet101_os8" and d["pretrained"] == "imagenet_v2"
    assert d["pseudo_masks"] == "irn" and d["use_confidence"] and d["fusion"] == "max" and d["epochs"] == 100


def test_a_null_experiment_is_dropped():
    cfg = validate_config({"experiments": {"baseline": None, "x": {}}}, extra_checks=False)
    assert list(cfg["experiments"]) == ["x"]


# ----------------------------------------------------------------------------------------------
# VOC dry runs


@pytest.fixture(scope="module")
def fake_voc(tmp_path_factory) -> Path:
    """A VOC root the DAG accepts (the train_aug list and the saliency folder EPS reads) and a
    working folder with a dummy ResNet-38 weights file (the config check wants the file)."""
    base = tmp_path_factory.mktemp("papers_voc")
    root = base / "VOCdevkit" / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("")
    (root / "SALImages").mkdir()
    (base / "work" / "weights").mkdir(parents=True)
    (base / "work" / "weights" / "resnet38_a1.pth").write_bytes(b"")
    return root


#: jobs each preset's VOC DAG has (beyond the common classifier, CAM and DeepLab stages)
DRY_JOBS = {
    "irn": {"train_irn": 1},
    "aeft": {"train_affinitynet": 1, "affinity_labels_shard": 2},
    "acr": {"train_irn": 1},
    # five runs (seeds 0-4), as HFPL's Table 2
    "hfpl": {"train_classifier": 5, "train_deeplab": 5, "train_affinitynet": 5, "affinity_labels_shard": 10},
    "smaf": {"train_classifier": 2, "train_deeplab": 2},
    "ktse": {"train_irn": 1},
}


@pytest.mark.parametrize("paper", PRESETS)
def test_preset_dry_runs_on_voc(fake_voc, paper):
    work = fake_voc.parents[1] / "work"
    out = snakemake(
        work,
        "-n",
        "--configfile",
        str(REPO / "config.yaml"),
        str(PAPERS / f"{paper}.yaml"),
        "--config",
        f"dataset={{name: voc12, root: {fake_voc}}}",
    ).stdout
    counts = job_counts(out)
    assert counts["train_classifier"] == DRY_JOBS[paper].get("train_classifier", 1), out
    assert counts["train_deeplab"] == DRY_JOBS[paper].get("train_deeplab", 1), out
    assert counts["deeplab_predict_shard"] == 8 * counts["train_deeplab"], out
    for job, n in DRY_JOBS[paper].items():
        assert counts.get(job) == n, (job, out)
    assert counts["summary_table"] == 1
    assert f"results/voc12/{EXPERIMENT[paper]}/s0/deeplab/metrics.csv" in out
    if paper == "hfpl":
        assert all(f"results/voc12/hfpl/s{seed}/deeplab/metrics.csv" in out for seed in range(5))
    assert "results/voc12/baseline/" not in out  # config.yaml's baseline is dropped


# ----------------------------------------------------------------------------------------------
# end to end on the tiny synthetic data


#: the preset run to the end of the DAG (its summary table); the others stop at the DeepLab
#: evaluation, which is the paper's result, to keep CI short
TO_SUMMARY = "irn"


@pytest.mark.slow
def test_every_preset_runs_end_to_end(tmp_path):
    """Each preset with the small-size override, up to its DeepLab evaluation, and IRN's to the
    summary table (one snakemake run per preset, --cores 2)."""
    times = {}
    for paper in PRESETS:
        work = tmp_path / paper
        work.mkdir()
        files = [str(REPO / "config.yaml"), str(PAPERS / f"{paper}.yaml"), str(TINY)]
        if paper in TINY_EXTRA:
            extra = work / "extra.yaml"
            extra.write_text(yaml.safe_dump(TINY_EXTRA[paper]))
            files.append(str(extra))
        run = f"results/synthetic-tiny/{EXPERIMENT[paper]}/s0"
        t0 = time.monotonic()
        target = "results/synthetic-tiny/tables/summary.csv" if paper == TO_SUMMARY else f"{run}/deeplab/metrics.csv"
        snakemake(work, "--cores", "2", "--configfile", *files, "--", target)
        times[paper] = round(time.monotonic() - t0)
        metrics = (work / run / "deeplab" / "metrics.csv").read_text().splitlines()
        header, row = metrics[0].split(","), metrics[1].split(",")
        miou = float(row[header.index("miou")])
        assert 0 <= miou <= 1, (paper, miou)
        assert (work / run / "classifier" / "model.pt").exists()
        refine = {"aeft": "affinitynet", "hfpl": "affinitynet", "smaf": "crf"}.get(paper, "irn/masks")
        assert any((work / run / refine).iterdir()), (paper, refine)
        if paper == "aeft":  # AEFT's model selection ran in the DAG: one evaluation per step, the best kept
            rows = pd.read_csv(work / run / "affinitynet" / "work" / "selection.csv")
            assert rows["step"].tolist() == [1, 2]
            chosen = torch.load(work / run / "affinitynet" / "model.pt", weights_only=False)["selection"]
            assert chosen["step"] == int(rows["best_step"].iloc[-1])
            assert not (work / run / "affinitynet" / "work" / "last.pt").exists()
        if paper == TO_SUMMARY:
            summary = pd.read_csv(work / target)
            assert summary["experiment"].tolist() == [EXPERIMENT[paper]]
            assert summary["deeplab_miou"].iloc[0] == pytest.approx(miou)
            assert 0 <= summary["seed_miou"].iloc[0] <= 1 and 0 <= summary["irn_miou"].iloc[0] <= 1
        shutil.rmtree(work)  # a preset's run holds several full-size models; CI disks are small
    print("end-to-end seconds per preset:", times)


# ----------------------------------------------------------------------------------------------
# DeepLab-v1 (SEAM's LargeFOV head)


def test_deeplabv1_shape_stride_and_head():
    from wsss.seg.models import DeepLabV1, build_seg_model

    torch.manual_seed(0)
    m = build_seg_model("deeplabv1", num_classes=5, backbone="resnet18_os8")
    assert isinstance(m, DeepLabV1) and m.output_stride == 8 and m.align_corners
    conv_fov = m.head[0][0]
    assert conv_fov.kernel_size == (3, 3) and conv_fov.dilation == (12, 12) and conv_fov.padding == (12, 12)
    assert conv_fov.bias is None and conv_fov.out_channels == 512
    assert m.head[1][0].kernel_size == (1, 1) and isinstance(m.head[2], torch.nn.Dropout)
    assert m.head[3].out_channels == 5 and m.head[3].bias is not None
    m.eval()
    x = torch.randn(2, 3, 64, 40)
    assert m.pre_logits(x).shape == (2, 5, 8, 5)
    assert m(x)["out"].shape == (2, 5, 64, 40)
    # ResNet-38 is its default backbone (HFPL), output stride 8, 4096 channels into the head
    big = build_seg_model("deeplabv1", num_classes=21)
    assert type(big.backbone).__name__ == "ResNet38" and big.head[0][0].in_channels == 4096
    with pytest.raises(ValueError, match="output-stride-8"):
        build_seg_model("deeplabv1", num_classes=5, backbone="resnet18")


def test_deeplabv1_trains_one_step():
    from wsss.seg.models import build_seg_model

    torch.manual_seed(0)
    m = build_seg_model("deeplabv1", num_classes=3, backbone="resnet18_os8", channels=32)
    m.train()
    x = torch.randn(2, 3, 48, 48)
    y = torch.randint(0, 3, (2, 48, 48))
    y[:, :4] = 255
    head = [p for mod in m.head_modules() for p in mod.parameters()]
    opt = torch.optim.SGD([{"params": list(m.backbone.parameters())}, {"params": head, "lr": 0.1}], lr=0.01)
    before = [p.detach().clone() for p in head]
    loss = torch.nn.functional.cross_entropy(m(x)["out"], y, ignore_index=255)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, head) if p.requires_grad)
    with torch.no_grad():
        assert torch.isfinite(m(x)["out"]).all()
