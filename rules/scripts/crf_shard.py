import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import crf_shard
from wsss.workflow.adapter import logged, scatter_index

with logged(snakemake):
    index, count = scatter_index(snakemake.wildcards.scatteritem)
    crf_shard(
        snakemake.params.cfg,
        list(snakemake.input.cams),
        snakemake.output.marker,
        index,
        count,
        threads=snakemake.threads,
        progress=False,
        sweep_csv=snakemake.input.sweep or None,
    )
