import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from pathlib import Path

from wsss.data.voc import VOC_LIST_SIZES, make_train_aug_list
from wsss.workflow.adapter import logged

with logged(snakemake) as log:
    root = Path(snakemake.output.ids).parents[2]
    n = make_train_aug_list(root, snakemake.output.ids, snakemake.params.given)
    log.info("train_aug: %d ids", n)
    if n != VOC_LIST_SIZES["train_aug"]:
        log.warning("the standard train_aug list has %d ids", VOC_LIST_SIZES["train_aug"])
