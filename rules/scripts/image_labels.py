import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
from wsss.data import open_dataset, split_union
from wsss.data.base import write_labels_csv
from wsss.workflow.adapter import logged

with logged(snakemake) as log:
    cfg = snakemake.params.cfg
    ds = open_dataset(cfg)
    ids = split_union(ds, [cfg["dataset"]["train_split"], cfg["dataset"]["eval_split"]])
    labels = {i: ds.labels(i) for i in ids}
    write_labels_csv(snakemake.output.labels, ids, labels, ds.class_names)
    log.info("wrote image-level labels of %d images", len(ids))
