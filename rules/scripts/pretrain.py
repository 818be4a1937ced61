import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pretrain.train import pretrain
from wsss.workflow.adapter import logged

with logged(snakemake):
    pretrain(
        snakemake.params.cfg,
        snakemake.output.model,
        snakemake.params.work_dir,
        threads=snakemake.threads,
        log_out=snakemake.output.log_csv,
    )
