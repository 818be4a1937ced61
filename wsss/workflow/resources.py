"""Resource requests of the rules, as pure functions of the retry ``attempt``.

Rules state what a job needs (threads, mem_mb, runtime in minutes, gpu); where it runs (account,
partition, GPU model) lives in the Slurm profile. Memory and runtime grow with ``attempt`` so a job
killed for memory or time succeeds when Snakemake resubmits it under ``--retries``.
"""

from __future__ import annotations


def scaled(base: int, attempt: int, factor: float = 1.5) -> int:
    """``base`` for attempt 1, multiplied by ``factor`` for every further attempt (rounded up)."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    value = base * factor ** (attempt - 1)
    return int(-(-value // 1))


def mem_mb(base: int):
    """A Snakemake resource callable: ``base`` MiB, x1.5 per retry."""

    def f(wildcards, attempt):
        return scaled(base, attempt)

    return f


def runtime(base_minutes: int):
    """A Snakemake resource callable: ``base_minutes``, x2 per retry (runtime is in minutes)."""

    def f(wildcards, attempt):
        return scaled(base_minutes, attempt, factor=2.0)

    return f
