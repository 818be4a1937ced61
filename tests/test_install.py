"""The README's main install (`pip install -e .`, no extras) brings everything `snakemake --report` needs.

The test extras bring pytest, and pytest brings pygments, which the HTML report imports (lazily,
inside the functions that render it). So a test environment cannot show a missing report
dependency by importing: instead, the packages the report path imports are compared with the
requirement closure of ``[project] dependencies`` (without extras), read from each installed
distribution's metadata.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Set

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]

#: Imported in a fresh interpreter: the report code of snakemake (every submodule) and what the
#: Snakefile imports from wsss when it is parsed for the report. Prints the top-level packages and
#: modules of site-packages that this loads.
_PROBE = r"""
import importlib, json, pkgutil, sys, sysconfig
from pathlib import Path

before = set(sys.modules)
import snakemake.report
for info in pkgutil.walk_packages(snakemake.report.__path__, "snakemake.report."):
    importlib.import_module(info.name)
import snakemake.api
import wsss.config, wsss.pipeline, wsss.workflow.paths, wsss.workflow.resources

site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
found = set()
for name in set(sys.modules) - before:
    f = getattr(sys.modules[name], "__file__", None)
    for s in site:
        if f and s in Path(f).resolve().parents:
            # the top-level entry in site-packages (a module may register under another name,
            # e.g. pandas/_libs/_cyutility.so as '_cyutility')
            found.add(Path(f).resolve().relative_to(s).parts[0].split(".")[0])
print(json.dumps(sorted(found)))
"""


def _main_dependencies() -> List[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def _closure(requirements: Iterable[str]) -> Set[str]:
    """Canonical names of ``requirements`` and, recursively, of what their installed distributions
    require, skipping requirements behind an extra that was not asked for (``extra == 'test'``)."""
    seen: Set[str] = set()
    stack = [(Requirement(r), ()) for r in requirements]
    while stack:
        req, parent_extras = stack.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *parent_extras)):
            continue
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # not installed here: nothing below it can be followed
        stack += [(Requirement(r), tuple(req.extras)) for r in dist.requires or []]
    return {k.split("[")[0] for k in seen}


def _lazy_report_imports() -> Set[str]:
    """Top-level modules imported anywhere in snakemake's report code, also inside functions
    (pygments is imported only when the report is rendered)."""
    import snakemake

    mods: Set[str] = set()
    for f in (Path(snakemake.__file__).parent / "report").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names}


def _report_modules() -> Set[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1])) | _lazy_report_imports()


def _distributions(modules: Iterable[str]) -> Dict[str, List[str]]:
    """Module -> canonical names of the installed distributions that provide it."""
    provided = md.packages_distributions()
    return {m: sorted({canonicalize_name(d) for d in provided.get(m, [])}) for m in modules}


def test_closure_follows_requirements_and_skips_extras():
    closure = _closure(["snakemake>=9"])
    assert {"snakemake", "jinja2", "docutils", "pyyaml"} <= closure  # direct and transitive requirements
    assert "pygments" in _closure(["pytest>=7"])  # how the test extras hid the missing dependency
    assert not _closure(['pytest>=7; extra == "test"'])  # extras-marked requirements are skipped


def test_report_needs_only_main_dependencies():
    """Every package `snakemake --report` imports is in the main dependencies' closure (pygments
    used to come only with the test extras, so the README's `pip install -e .` could not build the
    report)."""
    closure = _closure(_main_dependencies())
    assert {"snakemake", "torch"} <= closure
    mods = _report_modules()
    assert {"pygments", "jinja2", "docutils"} <= mods  # the probe sees the report's (lazy) imports
    dists = _distributions(mods)
    unmapped = sorted(m for m, d in dists.items() if not d)
    assert not unmapped, f"modules of the report path without an installed distribution: {unmapped}"
    missing = sorted(f"{m} ({', '.join(d)})" for m, d in dists.items() if not set(d) & closure)
    assert not missing, (
        "snakemake --report imports modules whose distributions are not in pyproject.toml's [project] "
        f"dependencies (nor required by them): {missing}; add them to `dependencies`"
    )
    assert "pygments" in closure
