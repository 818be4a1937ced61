import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.viz import training_curves
from wsss.workflow.adapter import logged

with logged(snakemake):
    training_curves(
        snakemake.input.log_csv,
        snakemake.output.png,
        title=f"{snakemake.wildcards.experiment}: {snakemake.wildcards.stage} loss terms",
    )
