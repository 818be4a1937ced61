import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import train_irn_stage
from wsss.workflow.adapter import logged

with logged(snakemake):
    train_irn_stage(
        snakemake.params.cfg,
        list(snakemake.input.labels),
        snakemake.input.classifier,
        snakemake.output.model,
        snakemake.params.work_dir,
        threads=snakemake.threads,
    )
