# wsss: weakly supervised semantic segmentation as one Snakemake DAG.
# Run from the repository root: `snakemake --cores all` (local) or `snakemake --profile profiles/slurm`.
import os

from snakemake.utils import min_version

min_version("9.0")


# the config.yaml next to this file (also when run with --directory); --configfile adds to it
configfile: os.path.join(workflow.basedir, "config.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/classifier.smk"
include: "rules/cam.smk"
include: "rules/refine.smk"
include: "rules/deeplab.smk"
include: "rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
