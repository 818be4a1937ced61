import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.pipeline import evaluate_seeds
from wsss.workflow.adapter import logged

with logged(snakemake):
    evaluate_seeds(snakemake.params.cfg, list(snakemake.input.shards), snakemake.output.sweep, snakemake.output.gallery)
