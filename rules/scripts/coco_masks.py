import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from pathlib import Path

from wsss.data.coco import prepare_coco_dataset
from wsss.workflow.adapter import logged

with logged(snakemake) as log:
    stats = prepare_coco_dataset(Path(snakemake.output.marker).parents[1], crowd=snakemake.params.crowd, progress=False)
    log.info("COCO masks: %s", stats)
