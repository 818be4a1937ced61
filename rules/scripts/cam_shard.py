import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import infer_cam_shard
from wsss.workflow.adapter import logged, scatter_index

with logged(snakemake):
    index, count = scatter_index(snakemake.wildcards.scatteritem)
    infer_cam_shard(
        snakemake.params.cfg,
        snakemake.input.model,
        snakemake.input.labels,
        snakemake.output.shard,
        index,
        count,
        threads=snakemake.threads,
    )
