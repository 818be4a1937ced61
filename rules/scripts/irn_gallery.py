import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import irn_gallery
from wsss.workflow.adapter import logged

with logged(snakemake):
    irn_gallery(
        snakemake.params.cfg,
        snakemake.input.model,
        list(snakemake.input.irn),
        snakemake.output.png,
        threads=snakemake.threads,
    )
