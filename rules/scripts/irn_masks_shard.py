import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import irn_masks_shard
from wsss.workflow.adapter import logged, scatter_index

with logged(snakemake):
    index, count = scatter_index(snakemake.wildcards.scatteritem)
    irn_masks_shard(
        snakemake.params.cfg,
        list(snakemake.input.cams),
        snakemake.input.model,
        snakemake.output.marker,
        snakemake.output.conf_marker,
        index,
        count,
        threads=snakemake.threads,
        progress=False,
    )
