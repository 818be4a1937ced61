# Shared helpers: config validation, paths, params and resources. Rules call only these names.
import re
import sys

# The Snakefile imports the package from this checkout; rule scripts do the same
# (first line of each script in rules/scripts/), so conda envs need only the dependencies.
sys.path.insert(0, workflow.basedir)

import wsss
import wsss.pipeline as wsss_pipeline
import wsss.workflow.resources as res
from wsss.config import (
    ConfigError,
    dataset_root,
    dataset_tag,
    experiment_config,
    stage_config,
    validate_config,
)
from wsss.workflow import paths as wpaths

try:
    CFG = validate_config(config)
    EXPERIMENT_CFG = {name: experiment_config(CFG, name) for name in CFG["experiments"]}
except ConfigError as e:
    raise WorkflowError(str(e)) from None

DATASET = dataset_tag(CFG)
DATA_ROOT = str(dataset_root(CFG))
RESULTS = f"results/{DATASET}"
LOGS = f"results/logs/{DATASET}"
EXPERIMENTS = sorted(CFG["experiments"])


wildcard_constraints:
    experiment="|".join(re.escape(e) for e in EXPERIMENTS),
    scatteritem=r"\d+-of-\d+",


def dataset_ready():
    """Files that say the configured dataset is complete (none for a user-given synthetic root)."""
    return wpaths.dataset_markers(CFG)


# Params are the config subset a stage depends on, so a change elsewhere does not rerun it.
def classifier_params(wildcards):
    return stage_config(EXPERIMENT_CFG[wildcards.experiment], "classifier")


def classifier_inputs(wildcards):
    """Other experiments' model files this experiment's training starts from (SMAF, ACR)."""
    return wsss_pipeline.classifier_inputs(EXPERIMENT_CFG[wildcards.experiment])


def cam_params(wildcards):
    return stage_config(EXPERIMENT_CFG[wildcards.experiment], "classifier", "cam")


def seed_eval_params(wildcards):
    return stage_config(EXPERIMENT_CFG[wildcards.experiment], "seed_eval")


def crf_params(wildcards):
    return stage_config(EXPERIMENT_CFG[wildcards.experiment], "classifier", "cam", "crf")


def irn_params(wildcards):
    return stage_config(EXPERIMENT_CFG[wildcards.experiment], "classifier", "cam", "irn")


def all_targets():
    targets = [f"{RESULTS}/stats.csv", f"{RESULTS}/montage.png"]
    for e in EXPERIMENTS:
        targets += [f"{RESULTS}/{e}/seeds/threshold_sweep.csv", f"{RESULTS}/{e}/seeds/gallery.png"]
        targets += [f"{RESULTS}/{e}/crf/metrics.csv"]
        targets += [f"{RESULTS}/{e}/irn/ir_labels/metrics.csv", f"{RESULTS}/{e}/irn/masks/metrics.csv"]
    return targets
