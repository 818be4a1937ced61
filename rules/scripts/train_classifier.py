import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import train_classifier
from wsss.workflow.adapter import logged

with logged(snakemake):
    train_classifier(
        snakemake.params.cfg,
        snakemake.input.labels,
        snakemake.output.model,
        snakemake.params.work_dir,
        threads=snakemake.threads,
        log_out=snakemake.output.log_csv,
    )
