import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import evaluate_deeplab
from wsss.workflow.adapter import logged

with logged(snakemake):
    evaluate_deeplab(
        snakemake.params.cfg,
        list(snakemake.input.markers),
        snakemake.output.metrics,
        snakemake.output.per_class,
        snakemake.output.gallery,
        progress=False,
    )
