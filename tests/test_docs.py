"""Documentation hygiene of the repository's own text files.

* Docstrings, comments and docs cite the repository's ``docs/`` pages or the papers and official
  code bases by name, never notes that live outside the repository (the spec files of the original
  brief): their names must not appear in any tracked text file.
* Every ``docs/<page>.md`` path cited in a ``.py``, ``.smk`` or ``.md`` file, and every relative
  Markdown link to a ``.md`` file inside ``docs/`` or the README, names a file that exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TEXT_SUFFIXES = {".py", ".md", ".smk", ".yaml", ".yml", ".toml", ".cfg"}
CITING_SUFFIXES = {".py", ".md", ".smk"}

# Built from pieces so that this file does not contain the names it forbids.
_MD = r"\.md"
FORBIDDEN = re.compile(
    "|".join(
        [
            "irn_deeplab" + _MD,  # the IRN/DeepLab notes
            "reference" + "/methods" + _MD,  # the method notes, by their path
            r"(?<![\w/.-])methods" + _MD,  # ... or by their bare name
        ]
    )
)
# A repository-relative docs path: not part of a longer path (``foo/docs/x.md``).
DOCS_PATH = re.compile(r"(?<![\w./-])docs/(?:[\w-]+/)*[\w.-]+?\.md\b")
# A relative Markdown link to a .md file: ``[text](path.md)`` or ``[text](path.md#anchor)``.
MD_LINK = re.compile(r"\]\((?!https?://)([^)#\s]+\.md)(?:#[^)\s]*)?\)")


def _text_files() -> list[Path]:
    """Tracked files plus untracked, non-ignored ones (new files count before their commit)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    files = sorted({ROOT / p for p in out.split("\0") if p})
    return [p for p in files if p.suffix in TEXT_SUFFIXES and p.is_file()]


def _lines(path: Path):
    text = path.read_text(encoding="utf-8", errors="replace")
    yield from enumerate(text.splitlines(), start=1)


def test_text_files_found():
    files = _text_files()
    rel = {p.relative_to(ROOT).as_posix() for p in files}
    assert "README.md" in rel and "tests/test_docs.py" in rel


def test_no_citations_of_notes_outside_the_repository():
    hits = []
    for path in _text_files():
        for no, line in _lines(path):
            for m in FORBIDDEN.finditer(line):
                hits.append(f"{path.relative_to(ROOT).as_posix()}:{no}: {m.group(0)!r}: {line.strip()}")
    assert not hits, (
        "cite the repository's docs/ pages or the paper and official code by name instead of:\n" + "\n".join(hits)
    )


def test_cited_docs_pages_exist():
    missing = []
    for path in _text_files():
        if path.suffix not in CITING_SUFFIXES:
            continue
        rel = path.relative_to(ROOT).as_posix()
        for no, line in _lines(path):
            for m in DOCS_PATH.finditer(line):
                if not (ROOT / m.group(0)).is_file():
                    missing.append(f"{rel}:{no}: {m.group(0)}")
            if path.suffix == ".md":
                for m in MD_LINK.finditer(line):
                    target = (path.parent / m.group(1)).resolve()
                    if not target.is_file():
                        missing.append(f"{rel}:{no}: link {m.group(1)}")
    assert not missing, "cited docs pages that do not exist:\n" + "\n".join(missing)
