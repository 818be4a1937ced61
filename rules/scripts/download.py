import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from pathlib import Path

from wsss.data.download import get_archive, prepare
from wsss.workflow.adapter import logged

with logged(snakemake) as log:
    # the data folder is the marker's folder minus the archive's conventional subfolder
    data_dir = Path(snakemake.output.marker).parents[len(Path(get_archive(snakemake.params.archive).subdir).parts)]
    marker = prepare(snakemake.params.archive, data_dir, progress=False, **snakemake.params.options)
    if Path(marker) != Path(snakemake.output.marker):
        raise RuntimeError(f"archive marker written to {marker}, expected {snakemake.output.marker}")
    log.info("prepared %s", marker)
