# Shared helpers: config validation, paths, params and resources. Rules call only these names.
import os
import re
import sys

# The Snakefile imports the package from this checkout; rule scripts do the same
# (first line of each script in rules/scripts/), so conda envs need only the dependencies.
# Nothing imported here imports torch (tests/test_envs.py): what needs it runs in a child process.
sys.path.insert(0, workflow.basedir)

import wsss
import wsss.workflow.resources as res
from wsss.config import (
    ConfigError,
    dataset_root,
    dataset_tag,
    fully_supervised_experiment,
    run_config,
    run_names,
    stage_config,
    validate_config,
)
from wsss.pretrain import weights_inputs
from wsss.workflow import config_check as wcheck
from wsss.workflow import paths as wpaths
from wsss.workflow import stages as wstages

try:
    # schema, numbers and ranges here; the checks that need torch (registry names, options,
    # pretrained weights, networks) and each run's classifier input files in a child process,
    # its answer kept in .snakemake/wsss/ per config and code (wsss.workflow.config_check)
    CFG = validate_config(config, extra_checks=False)
    # one run per experiment and seed; the `experiment` wildcard is the run: <experiment>/s<seed>
    EXPERIMENT_CFG = {run: run_config(CFG, run, extra_checks=False) for run in run_names(CFG)}
    CHECKED = wcheck.checked_config(CFG, os.path.join(".snakemake", "wsss"))
except ConfigError as e:
    raise WorkflowError(str(e)) from None

DATASET = dataset_tag(CFG)
DATA_ROOT = str(dataset_root(CFG))
RESULTS = f"results/{DATASET}"
LOGS = f"results/logs/{DATASET}"
EXPERIMENTS = run_names(CFG)


wildcard_constraints:
    experiment="|".join(re.escape(e) for e in EXPERIMENTS),
    scatteritem=r"\d+-of-\d+",
    masks="|".join(re.escape(m) for m in ("crf", "irn/ir_labels", "irn/masks", "affinitynet/masks")),


def dataset_ready():
    """Files that say the configured dataset is complete (none for a user-given synthetic root)."""
    return wpaths.dataset_markers(CFG)


# Params are exactly the config keys a stage's own code reads (wsss.workflow.stages): upstream
# changes reach a job through its input files, so a change elsewhere does not rerun it, and
# scatter counts (`shards`) are never params.
def stage_params(stage):
    """A params function: the ``stage`` config of the job's experiment."""

    def params(wildcards):
        return wstages.stage_params(EXPERIMENT_CFG[wildcards.experiment], stage)

    return params


def classifier_inputs(wildcards):
    """Other experiments' model files this experiment's training starts from (SMAF, ACR) and the
    saliency maps of the methods trained on them (EPS)."""
    return CHECKED["classifier_inputs"][wildcards.experiment]


def pretrained_weights(section, sub=None):
    """An input function: the formula-driven weights file (rule pretrain) when the stage's
    ``pretrained`` is ``procedural``, so the DAG makes it first; else nothing."""

    def inputs(wildcards):
        cfg = EXPERIMENT_CFG[wildcards.experiment][section]
        cfg = cfg[sub] if sub else cfg
        return weights_inputs(cfg["pretrained"], cfg["backbone"])

    return inputs


def classifier_params(wildcards):
    """The classifier stage config; plus the `saliency` section for methods trained on saliency
    maps (EPS), so that only their jobs depend on it."""
    run_cfg = EXPERIMENT_CFG[wildcards.experiment]
    params = wstages.stage_params(run_cfg, "classifier")
    if CHECKED["needs_saliency"][wildcards.experiment]:
        params["saliency"] = dict(run_cfg["saliency"])
    return params


def crf_sweep(wildcards):
    """The seed threshold sweep of a run whose CRF takes its background from it (crf.from_seeds)."""
    if EXPERIMENT_CFG[wildcards.experiment]["crf"]["from_seeds"]:
        return f"{RESULTS}/{wildcards.experiment}/seeds/threshold_sweep.csv"
    return []


#: mask folder under a run -> (kind recorded in metrics.csv, scatter name of its shards)
MASK_KINDS = {"crf": ("crf", "crf"), "irn/ir_labels": ("ir_labels", "irn"), "irn/masks": ("irn", "irn"),
              "affinitynet/masks": ("affinitynet", "affinitynet")}


def mask_markers(wildcards):
    """Shard markers of the mask folder ``wildcards.masks`` (rule eval_masks)."""
    return _shard_markers(wildcards.masks, MASK_KINDS[wildcards.masks][1], wildcards)


def _shard_markers(folder, scatter_name, wildcards):
    n = CFG[scatter_name]["shards"] if scatter_name != "seeds" else CFG["cam"]["shards"]
    return [f"{RESULTS}/{wildcards.experiment}/{folder}/shard-{i}-of-{n}.json" for i in range(1, n + 1)]


def seed_mask_markers(wildcards):
    return _shard_markers("seeds/masks", "seeds", wildcards)


def deeplab_mask_markers(wildcards):
    """Shard markers of the pseudo-masks DeepLab trains on (none for ground truth)."""
    source = EXPERIMENT_CFG[wildcards.experiment]["deeplab"]["pseudo_masks"]
    folder = {"seeds": ("seeds/masks", "seeds"), "crf": ("crf", "crf"), "irn": ("irn/masks", "irn"),
              "affinitynet": ("affinitynet/masks", "affinitynet"), "gt": None}[source]
    return _shard_markers(*folder, wildcards) if folder else []


def deeplab_confidence_markers(wildcards):
    d = EXPERIMENT_CFG[wildcards.experiment]["deeplab"]
    return _shard_markers("irn/confidence", "irn", wildcards) if d["use_confidence"] and d["pseudo_masks"] == "irn" else []


def experiment_targets(e):
    """Final outputs of experiment ``e`` (pseudo-mask evaluations are skipped for ground-truth
    DeepLab runs, which need no pseudo-masks; AffinityNet runs only where DeepLab trains on it)."""
    targets = [f"{RESULTS}/{e}/deeplab/metrics.csv"]
    targets += [f"{RESULTS}/{e}/deeplab/training_curves.png"]
    if EXPERIMENT_CFG[e]["deeplab"]["pseudo_masks"] != "gt":
        targets += [f"{RESULTS}/{e}/classifier/training_curves.png", f"{RESULTS}/{e}/pseudo_mask_gallery.png", f"{RESULTS}/{e}/irn/gallery.png",
                    f"{RESULTS}/{e}/seeds/threshold_sweep.csv", f"{RESULTS}/{e}/seeds/gallery.png",
                    f"{RESULTS}/{e}/crf/metrics.csv", f"{RESULTS}/{e}/irn/ir_labels/metrics.csv",
                    f"{RESULTS}/{e}/irn/masks/metrics.csv"]
    if EXPERIMENT_CFG[e]["deeplab"]["pseudo_masks"] == "affinitynet":
        targets += [f"{RESULTS}/{e}/affinitynet/masks/metrics.csv"]
    return targets


def summary_inputs():
    return [t for e in EXPERIMENTS for t in experiment_targets(e)]


def all_targets():
    return [f"{RESULTS}/stats.csv", f"{RESULTS}/montage.png", f"{RESULTS}/tables/summary.csv", f"{RESULTS}/tables/ablation.csv"]
