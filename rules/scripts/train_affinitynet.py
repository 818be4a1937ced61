import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline_affinitynet import train_affinitynet_stage
from wsss.workflow.adapter import logged

with logged(snakemake):
    train_affinitynet_stage(
        snakemake.params.cfg,
        list(snakemake.input.labels),
        snakemake.input.classifier,
        snakemake.output.model,
        snakemake.params.work_dir,
        cam_paths=list(snakemake.input.cams),
        threads=snakemake.threads,
    )
