"""wsss: weakly supervised semantic segmentation as a Snakemake workflow.

The package holds all logic; the Snakemake rules under ``rules/`` are thin adapters that call it.
"""

__version__ = "0.1.0"
