import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from pathlib import Path

from wsss.data.synthetic import generate_synthetic
from wsss.workflow.adapter import logged

with logged(snakemake) as log:
    stats = generate_synthetic(
        Path(snakemake.output.marker).parent,
        preset=snakemake.params.preset,
        seed=snakemake.params.seed,
        **dict(snakemake.params.overrides),
    )
    log.info("synthetic dataset: %s", stats)
