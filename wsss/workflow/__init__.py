"""Pure helpers used by the Snakemake rules (paths, resources); unit-tested without Snakemake."""


def process_context():
    """Multiprocessing context for CPU worker pools inside rule scripts.

    ``fork`` where available: Snakemake runs rule scripts as ``__main__``, and a ``spawn`` child
    re-executes ``__main__``, which fails in a rule script (no ``snakemake`` object) and makes a
    Pool respawn its workers forever. The workers only run numpy/pydensecrf code.
    """
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")
