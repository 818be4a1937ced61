import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import mask_gallery
from wsss.workflow.adapter import logged

with logged(snakemake):
    mask_gallery(
        snakemake.params.cfg,
        list(snakemake.input.seeds),
        list(snakemake.input.crf),
        list(snakemake.input.irn),
        snakemake.output.png,
    )
