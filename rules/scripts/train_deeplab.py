import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import launch_deeplab_training
from wsss.workflow.adapter import logged

with logged(snakemake):
    # more than one GPU (resources gpu=N): one process per GPU under torchrun, DDP
    launch_deeplab_training(
        snakemake.params.cfg,
        list(snakemake.input.masks),
        list(snakemake.input.confidence),
        snakemake.output.model,
        snakemake.params.work_dir,
        threads=snakemake.threads,
        gpus=snakemake.resources.get("gpu", 0),
        log_out=snakemake.output.log_csv,
    )
