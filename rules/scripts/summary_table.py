import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.tables import write_summary
from wsss.workflow.adapter import logged

with logged(snakemake):
    write_summary(
        snakemake.params.results,
        snakemake.params.experiments,
        snakemake.output.csv,
        snakemake.output.md,
        fully_supervised=snakemake.params.fully_supervised,
        ablation_csv=snakemake.output.ablation,
        ablation_md=snakemake.output.ablation_md,
    )
