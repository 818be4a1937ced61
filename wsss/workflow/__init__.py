"""Pure helpers used by the Snakemake rules (paths, resources); unit-tested without Snakemake."""
