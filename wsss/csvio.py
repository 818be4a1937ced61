"""Reading the CSV/TSV tables that stages write for each other, with the checks that keep a damaged
file from turning into a wrong number downstream.

:func:`read_csv_checked` raises :class:`~wsss.io.DataError` naming the file when it is missing,
empty or header-only, ends without a final newline (the writer was stopped mid-line: every table of
this workflow is written by pandas or Snakemake, which end each line with a newline), has a row with
more or fewer fields than the header (a file cut mid-row, which pandas would otherwise fill with
NaN), lacks a column the reader needs, has the wrong number of rows, or has an empty value in a
column that must be filled.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import pandas as pd

from .io import DataError

__all__ = ["read_csv_checked", "csv_records"]


def csv_records(text: str, path: Path, sep: str = ",") -> Iterator[Tuple[int, List[str]]]:
    """``(line number, fields)`` of every non-blank record of ``text`` (the header included).

    Line numbers are 1-based lines of the file (a quoted field spanning lines counts as the line
    its record ends on). Blank lines are skipped, as pandas skips them. A malformed record (an
    unterminated quote, for one) raises :class:`DataError` naming ``path`` and the line.
    """
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    try:
        for fields in reader:
            if fields:
                yield reader.line_num, fields
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from e


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from e


def read_csv_checked(
    path: str | os.PathLike,
    columns: Sequence[str] = (),
    rows: Optional[int] = None,
    *,
    sep: str = ",",
    nonnull: Sequence[str] = (),
    what: str = "table",
) -> pd.DataFrame:
    """Read a CSV (or with ``sep="\\t"`` a TSV) table that another stage wrote, checking it first.

    ``columns`` must all be present; ``rows`` is the exact number of data rows (``None``: at least
    one); the columns in ``nonnull`` may hold no empty or NaN value. ``what`` names the kind of file
    in messages (``"metrics file"``). Any fault raises :class:`DataError` naming the file, and the
    line or column at fault. Returns what ``pandas.read_csv`` returns for the same file.
    """
    path = Path(path)
    text = _read_text(path, what)
    if not text.strip():
        raise DataError(
            f"{what} {path} is empty (no header, no rows); the job that wrote it may have been killed: rerun it"
        )
    if not text.endswith("\n"):
        raise DataError(
            f"{what} {path} ends mid-line (no final newline): the file was cut while being written; rerun the job that writes it"
        )
    records = list(csv_records(text, path, sep))
    header_line, header = records[0]
    lines = []
    for line, fields in records[1:]:
        if len(fields) != len(header):
            missing = header[len(fields) :]
            detail = f"; no value for column(s) {missing}" if missing else ""
            raise DataError(
                f"{what} {path}, line {line}: {len(fields)} field(s) but the header (line {header_line}) has "
                f"{len(header)}{detail}; the file is cut or damaged: rerun the job that writes it"
            )
        lines.append(line)
    if not lines:
        raise DataError(
            f"{what} {path} has a header but no data rows; the job that wrote it may have been killed: rerun it"
        )
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep)
    except (ValueError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
        raise DataError(f"cannot parse {what} {path}: {e}") from e
    needed = list(dict.fromkeys([*columns, *nonnull]))
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{what} {path} has no column(s) {missing}; its columns are {list(df.columns)}")
    if rows is not None and len(df) != rows:
        raise DataError(f"{what} {path} has {len(df)} data row(s); expected exactly {rows}")
    for c in nonnull:
        empty = df[c].isna().to_numpy()
        if empty.any():
            at = [lines[i] if len(lines) == len(df) else i + 2 for i in empty.nonzero()[0][:5]]
            raise DataError(f"{what} {path}: column {c!r} has no value (empty or NaN) on line(s) {at}")
    return df
