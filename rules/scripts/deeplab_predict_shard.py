import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import deeplab_predict_shard
from wsss.workflow.adapter import logged, scatter_index

with logged(snakemake):
    index, count = scatter_index(snakemake.wildcards.scatteritem)
    deeplab_predict_shard(
        snakemake.params.cfg,
        snakemake.input.model,
        snakemake.output.marker,
        index,
        count,
        threads=snakemake.threads,
        progress=False,
    )
