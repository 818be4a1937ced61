import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline_affinitynet import affinitynet_masks_shard
from wsss.workflow.adapter import logged, scatter_index

with logged(snakemake):
    index, count = scatter_index(snakemake.wildcards.scatteritem)
    affinitynet_masks_shard(
        snakemake.params.cfg,
        list(snakemake.input.cams),
        snakemake.input.model,
        snakemake.output.marker,
        index,
        count,
        threads=snakemake.threads,
        progress=False,
    )
