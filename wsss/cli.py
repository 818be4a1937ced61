"""The ``wsss`` command (also ``python -m wsss``): a thin argparse front end.

``wsss status`` lists outputs under ``results/`` made by another package version or config
(:mod:`wsss.status`); ``wsss show`` draws one image through the pipeline (:mod:`wsss.show`).
Exit codes: 0 success (``status``: everything current), 1 (``status`` only) some output is stale,
2 an error (bad arguments, an invalid config, an unknown image or run, a missing results folder).
See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from . import __version__

EXIT_OK, EXIT_STALE, EXIT_ERROR = 0, 1, 2
DEFAULT_CONFIG = "config.yaml"


class CliError(Exception):
    """An error the command reports in one line (exit code 2)."""


def snakefile_config() -> Optional[Path]:
    """The ``config.yaml`` the Snakefile always reads first (its ``configfile:`` directive, before
    any ``--configfile``): the one beside ``./Snakefile``, else beside the Snakefile of the checkout
    this package is installed from (``pip install -e .``); None when there is neither."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "Snakefile").is_file() and (root / DEFAULT_CONFIG).is_file():
            return root / DEFAULT_CONFIG
    return None


def config_files(configfile: Optional[Sequence[str]], no_config: bool = False) -> Optional[List[str]]:
    """The config files snakemake would merge for ``snakemake --configfile <configfile>``: the
    Snakefile's ``config.yaml`` (:func:`snakefile_config`), then ``configfile`` in order (the
    Snakefile's file given again is read once). None for ``--no-config`` or when there is none."""
    if no_config:
        return None
    base = snakefile_config()
    files = [str(base)] if base is not None else []
    for f in configfile or []:
        if base is None or Path(f).resolve() != base.resolve():
            files.append(f)
    return files or None


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--configfile",
        nargs="+",
        metavar="FILE",
        help="the config files given to snakemake --configfile; as in snakemake they are merged in "
        f"order onto the Snakefile's {DEFAULT_CONFIG}, which is read in any case",
    )
    g.add_argument("--no-config", action="store_true", help="read no config file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsss",
        description="Inspect the outputs of the wsss Snakemake workflow (run the workflow itself with snakemake).",
        epilog="Exit codes: 0 ok, 1 stale outputs (status), 2 error. Details: docs/cli.md",
    )
    parser.add_argument("--version", action="version", version=f"wsss {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    st = sub.add_parser(
        "status",
        help="list outputs made by another package version or config (exit 1 if any is stale)",
        description="List the outputs under the results folder with the package version and config hash that made "
        "them, compared with this package's version and the current config of each stage. Snakemake "
        "does not rerun jobs when code in wsss/ changes; this says which outputs predate it. "
        "Exit code 0 when every output is current, 1 when some output is stale, 2 on an error.",
    )
    st.add_argument("--results", default="results", help="the results folder (default: results)")
    _add_config_args(st)
    st.add_argument("--stale-only", action="store_true", help="list only stale outputs")
    st.set_defaults(func=cmd_status)

    sh = sub.add_parser(
        "show",
        help="write one image's panel: image, GT, CAM, seeds, CRF, IRN, ... of one run",
        description="Write one PNG with the image, its ground truth, its CAM and every mask the run made for it "
        "(seeds, CRF, IR labels, IRN, DeepLab), each panel only where the output exists.",
    )
    sh.add_argument("image_id", help="image id, as in the dataset's image lists (e.g. 2007_000032, syn_000405)")
    sh.add_argument("--results", default="results", help="the results folder (default: results)")
    sh.add_argument("--dataset", help="dataset folder under results (default: the config's, or the only one there)")
    sh.add_argument(
        "--experiment",
        metavar="RUN",
        help="run <experiment>/s<seed>, e.g. baseline/s0 (default: the config's first run, or the only one)",
    )
    sh.add_argument("--out", help="output PNG (default: <image_id>_panel.png)")
    sh.add_argument("--per-class", action="store_true", help="one CAM panel per present class instead of their maximum")
    sh.add_argument("--tile", type=int, default=256, help="panel size in pixels (default: 256)")
    _add_config_args(sh)
    sh.set_defaults(func=cmd_show)
    return parser


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect_status, format_table, load_config, summary_line

    cfg = None
    files = config_files(args.configfile, args.no_config)
    if files:
        cfg = load_config(files)
    results = Path(args.results)
    statuses = collect_status(results, cfg)
    shown = [s for s in statuses if s.stale] if args.stale_only else statuses
    if shown:
        print(format_table(shown))
    if files:
        print(f"config: {' + '.join(files)}")
    else:
        print("no config read: config match is unknown")
    print(summary_line(statuses))
    return EXIT_STALE if any(s.stale for s in statuses) else EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from .show import dataset_tags, recorded_config, runs_in, write_image_panel

    if args.tile < 32:
        raise CliError(f"--tile must be at least 32 pixels, got {args.tile}")
    results = Path(args.results)
    if not results.is_dir():
        raise CliError(f"results folder not found: {results}")
    cfg = None
    files = config_files(args.configfile, args.no_config)
    if files:
        from .status import load_config

        cfg = load_config(files)
    from .config import dataset_tag, run_names

    tag = args.dataset or (dataset_tag(cfg) if cfg is not None else None)
    if args.dataset is None and tag is not None and not (results / tag).is_dir() and len(dataset_tags(results)) == 1:
        tag = None  # the config's dataset has no results, but there is only one: show that one
    if tag is None:
        tags = dataset_tags(results)
        if len(tags) != 1:
            raise CliError(f"give --dataset: {results} holds {', '.join(tags) if tags else 'no dataset folders'}")
        tag = tags[0]
    if not (results / tag).is_dir():
        raise CliError(
            f"no results for dataset {tag!r}: {results / tag} does not exist (found: {', '.join(dataset_tags(results)) or 'none'})"
        )
    available = runs_in(results / tag)
    run = args.experiment
    if run is None:
        configured = (
            [r for r in run_names(cfg) if r in available] if cfg is not None and dataset_tag(cfg) == tag else []
        )
        if configured:
            run = configured[0]
        elif len(available) == 1:
            run = available[0]
        else:
            raise CliError(f"give --experiment: runs under {results / tag}: {', '.join(available) or 'none'}")
    run_dir = results / tag / run
    if not run_dir.is_dir():
        raise CliError(f"run {run!r} not found: {run_dir} does not exist (runs: {', '.join(available) or 'none'})")

    data_cfg = cfg if cfg is not None and dataset_tag(cfg) == tag else recorded_config(run_dir)
    if data_cfg is None:
        raise CliError(
            f"cannot tell where the images of {results / tag} are: give --configfile "
            f"(no output of {run_dir} records its config)"
        )
    from .data import open_dataset

    ds = open_dataset(data_cfg)
    out = Path(args.out or f"{args.image_id}_panel.png")
    panels = write_image_panel(
        ds,
        run_dir,
        args.image_id,
        out,
        per_class=args.per_class,
        tile=args.tile,
        caption=f"{args.image_id} - {tag}/{run}",
    )
    print(f"wrote {out}: {', '.join(panels.titles)}")
    for note in panels.notes:
        print(f"  not shown: {note}")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_ERROR
    from .config import ConfigError
    from .io import DataError
    from .show import ShowError

    try:
        return args.func(args)
    except (CliError, ConfigError, DataError, ShowError, FileNotFoundError) as e:
        msg = str(e) if not isinstance(e, FileNotFoundError) or e.filename is None else f"{e.strerror}: {e.filename}"
        print(f"wsss {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
