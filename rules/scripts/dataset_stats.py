import sys

sys.path.insert(0, snakemake.scriptdir + "/../..")  # the wsss package of this checkout
import wsss
from wsss.config import config_hash
from wsss.data import open_dataset
from wsss.data.stats import write_stats
from wsss.workflow.adapter import logged

with logged(snakemake):
    cfg = snakemake.params.cfg
    ds = open_dataset(cfg)
    write_stats(
        ds,
        ds.splits(),
        snakemake.output.stats,
        snakemake.output.montage,
        n_montage=cfg["stats"]["montage_images"],
        progress=False,
        provenance={"package_version": wsss.__version__, "config_hash": config_hash(cfg)},
    )
