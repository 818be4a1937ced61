import sys; sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import train_deeplab
from wsss.workflow.adapter import logged

with logged(snakemake):
    train_deeplab(snakemake.params.cfg, list(snakemake.input.masks), list(snakemake.input.confidence),
                  snakemake.output.model, snakemake.params.work_dir, threads=snakemake.threads)
