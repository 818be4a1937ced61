import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import evaluate_mask_shards
from wsss.workflow.adapter import logged

with logged(snakemake):
    evaluate_mask_shards(
        snakemake.params.cfg,
        list(snakemake.input.markers),
        snakemake.output.metrics,
        snakemake.output.per_class,
        snakemake.params.kind,
    )
