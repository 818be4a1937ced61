"""The conda envs of the rules (``--software-deployment-method conda``) and the Snakefile's own imports.

Each rule with a ``conda:`` env runs its script in that env, which holds only the packages
``envs/<env>.yaml`` lists (and their dependencies). Per env, one subprocess replaces the path
finder in ``sys.meta_path`` by one that does not see the installed distributions the env does not
provide (their imports raise ModuleNotFoundError, as in the env), then does what each of the env's
rule scripts does at import: its own imports, and for every ``wsss`` function it imports (the stage
function it calls) the imports inside that function and inside the ``wsss`` functions and classes
(their methods) it names, recursively (the lazy imports that run when the stage runs). The standard
library, ``wsss`` itself and ``snakemake`` (the script preamble) are always importable. A second
check: every package an env lists is imported by one of its rules.

The Snakefile side (``rules/*.smk`` and the Snakefile, at DAG build time) must not import torch:
``snakemake -n`` would spend most of its time and memory on it.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Set

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "rules"

#: conda package name -> distribution name (pip metadata) where they differ
CONDA_TO_DIST = {"pytorch": "torch"}
#: env entries that are no importable package
NOT_PACKAGES = {"python", "pip"}
#: importable in every env: the checkout (rule scripts put it on sys.path) and the script preamble
ALWAYS = {"wsss", "snakemake"}


class Rule(NamedTuple):
    name: str
    env: Path
    script: Path


def parse_rules() -> List[Rule]:
    """``rule name -> conda env file, script file`` of every rule in ``rules/*.smk`` with both."""
    out = []
    for smk in sorted(RULES.glob("*.smk")):
        lines = smk.read_text().splitlines()
        blocks, start = [], None
        for i, line in enumerate(lines):
            if re.match(r"^\s*rule\b[^:]*:", line):
                if start is not None:
                    blocks.append(lines[start:i])
                start = i
        if start is not None:
            blocks.append(lines[start:])
        for block in blocks:
            m = re.match(r"^\s*rule\s*(\w*)\s*:", block[0])
            found: Dict[str, str] = {}
            for j, line in enumerate(block[:-1]):
                key = line.strip().rstrip(":")
                if line.strip().endswith(":") and key in ("conda", "script", "name"):
                    found[key] = block[j + 1].strip().rstrip(",")
            if "conda" in found and "script" in found:
                script = smk.parent / ast.literal_eval(found["script"])
                name = m.group(1) or script.stem  # ``rule:`` with a name directive (f-string): the script's name
                out.append(Rule(name, (smk.parent / ast.literal_eval(found["conda"])).resolve(), script.resolve()))
    return out


ALL_RULES = parse_rules()
ENVS = sorted({r.env for r in ALL_RULES})


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_packages(env: Path) -> List[str]:
    """Distribution names (normalised) of the packages ``env`` lists, conda and pip."""
    deps = yaml.safe_load(env.read_text())["dependencies"]
    names = []
    for d in deps:
        items = [(d, True)] if isinstance(d, str) else [(p, False) for p in d.get("pip", [])]
        for spec, conda in items:
            name = _norm(re.match(r"[A-Za-z0-9_.\-]+", spec).group(0))
            if name in NOT_PACKAGES:
                continue
            names.append(_norm(CONDA_TO_DIST.get(name, name)) if conda else name)
    return names


def _requires(dist: str) -> Set[str]:
    """Distributions ``dist`` needs (no extras), as installed here."""
    try:
        reqs = md.distribution(dist).requires or []
    except md.PackageNotFoundError:
        return set()
    return {_norm(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in reqs if "extra ==" not in r.replace("'", '"')}


def closure(dists: List[str]) -> Set[str]:
    seen, todo = set(), list(dists)
    while todo:
        d = todo.pop()
        if d not in seen:
            seen.add(d)
            todo += sorted(_requires(d) - seen)
    return seen


@functools.lru_cache(maxsize=1)
def module_dists() -> Dict[str, Set[str]]:
    """Top-level module -> normalised names of the installed distributions that provide it."""
    return {m: {_norm(d) for d in ds} for m, ds in md.packages_distributions().items()}


def blocked_modules(env: Path) -> List[str]:
    allowed = closure(env_packages(env))
    return sorted(m for m, ds in module_dists().items() if not ds & allowed and m not in ALWAYS)


# Runs in the subprocess: argv[1] = {"env", "blocked", "scripts": {rule: script path}}; prints
# {"errors": {rule: traceback}, "modules": [top-level modules loaded]} as the last line.
_PROBE = r'''
import ast, importlib, importlib.machinery, importlib.util, inspect, json, sys, textwrap, traceback, types

ARGS = json.loads(sys.argv[1])
BLOCKED = set(ARGS["blocked"])


REFUSED = []


class EnvPathFinder(importlib.machinery.PathFinder):
    """The path finder, blind to the modules of distributions the env does not provide (as if
    they were not installed: imports raise ModuleNotFoundError, importlib.util.find_spec is None)."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in BLOCKED:
            REFUSED.append(fullname)
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [EnvPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]


def import_from(node, package):
    base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
    mod = importlib.import_module(base)
    objs = []
    for a in node.names:
        if a.name == "*":
            continue
        objs.append(getattr(mod, a.name) if hasattr(mod, a.name) else importlib.import_module(f"{base}.{a.name}"))
    return objs


def walk(fn, seen):
    """The imports inside ``fn`` and the ``wsss`` functions and classes (their methods) it names,
    recursively."""
    if isinstance(fn, type) and fn.__module__.startswith("wsss") and fn not in seen:
        seen.add(fn)
        for attr in vars(fn).values():
            walk(attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr, seen)
        return
    fn = inspect.unwrap(fn) if callable(fn) else fn
    if not isinstance(fn, types.FunctionType) or fn in seen or not (fn.__module__ or "").startswith("wsss"):
        return
    seen.add(fn)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return
    package = sys.modules[fn.__module__].__package__
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                importlib.import_module(a.name)
        elif isinstance(node, ast.ImportFrom):
            for obj in import_from(node, package):
                walk(obj, seen)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            walk(fn.__globals__.get(node.id), seen)


def probe(script):
    """What the rule script imports, and what the wsss functions it imports import when they run."""
    tree = ast.parse(open(script).read(), filename=script)
    seen = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                importlib.import_module(a.name)
        elif isinstance(node, ast.ImportFrom):
            for obj in import_from(node, None):
                walk(obj, seen)


errors = {}
for rule, script in sorted(ARGS["scripts"].items()):
    del REFUSED[:]
    try:
        probe(script)
    except BaseException:
        errors[rule] = traceback.format_exc(limit=-4) + f"modules refused ({ARGS['env']} lacks them): {sorted(set(REFUSED))}\n"
print(json.dumps({"errors": errors, "modules": sorted({m.partition(".")[0] for m in sys.modules})}))
'''


@functools.lru_cache(maxsize=None)
def probe_env(env: Path) -> dict:
    """Run every rule script of ``env`` (imports only) under that env's import blocker."""
    scripts = {r.name: str(r.script) for r in ALL_RULES if r.env == env}
    args = {"env": str(env.relative_to(ROOT)), "blocked": blocked_modules(env), "scripts": scripts}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rules_are_found():
    names = {r.name for r in ALL_RULES}
    assert {
        "seed_eval",
        "crf_shard",
        "eval_masks",
        "ir_labels_shard",
        "seed_masks_shard",
        "eval_deeplab",
        "mask_gallery",
        "summary_table",
        "cam_shard",
        "train_classifier",
        "download",
    } <= names
    assert {r.env.name for r in ALL_RULES} == {"data.yaml", "crf.yaml", "torch.yaml"}
    assert all(r.script.is_file() for r in ALL_RULES)
    conda = sum(len(re.findall(r"^\s*conda:", f.read_text(), re.M)) for f in RULES.glob("*.smk"))
    assert conda == len(ALL_RULES), "a rule with a conda env runs no script (shell/run): this test does not see it"


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: f"{r.name}-{r.env.stem}")
def test_rule_imports_in_its_env(rule):
    errors = probe_env(rule.env)["errors"]
    assert rule.name not in errors, (
        f"rule {rule.name} ({rule.script.relative_to(ROOT)}) cannot import in {rule.env.relative_to(ROOT)}:\n"
        f"{errors[rule.name]}"
    )


@pytest.mark.parametrize("env", ENVS, ids=lambda e: e.stem)
def test_env_lists_only_what_its_rules_import(env):
    loaded = set()
    for m in probe_env(env)["modules"]:
        loaded |= module_dists().get(m, set())
    unused = sorted(set(env_packages(env)) - loaded)
    assert not unused, f"{env.relative_to(ROOT)} lists packages none of its rules imports: {unused}"


def test_blocker_refuses_what_an_env_lacks():
    """The probe can fail: torch is refused in the data env, allowed in the torch env."""
    data = next(e for e in ENVS if e.name == "data.yaml")
    torch_env = next(e for e in ENVS if e.name == "torch.yaml")
    assert "torch" in blocked_modules(data) and "pydensecrf" in blocked_modules(data)
    assert "numpy" not in blocked_modules(data) and "dateutil" not in blocked_modules(data)  # pandas needs it
    assert "torch" not in blocked_modules(torch_env)
    code = _PROBE.split("\n\ndef import_from")[0] + "\nimport torch\n"
    args = {"env": "envs/data.yaml", "blocked": blocked_modules(data), "scripts": {}}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr


# ----------------------------------------------------------------------------------------------
# the Snakefile side: no torch at DAG build time

#: Hides torch from the process it runs in (imports raise ModuleNotFoundError) and lists, at exit,
#: the modules that asked for it.
_NO_TORCH = r"""
import atexit, importlib.machinery, sys

ASKED = []


class NoTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in ("torch", "torchvision"):
            ASKED.append(fullname)
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
atexit.register(lambda: print("torch asked for:", sorted(set(ASKED)), file=sys.stderr))
"""


def smk_imports() -> List[str]:
    """The import statements of the Snakefile and ``rules/*.smk`` (module level, Python syntax)."""
    out = []
    for f in [ROOT / "Snakefile", *sorted(RULES.glob("*.smk"))]:
        for m in re.finditer(r"^(?:import [^\n]+|from \S+ import (?:\([^)]*\)|[^\n]+))", f.read_text(), re.M):
            out.append(m.group(0))
    return out


def test_snakefile_imports_no_torch():
    """What the Snakefile and the rule files import, and the config validation they run
    (``extra_checks=False``; the rest runs in a child, :mod:`wsss.workflow.config_check`)."""
    imports = smk_imports()
    assert any("wsss" in i for i in imports), imports
    code = "\n".join(
        [
            "import sys",
            f"sys.path.insert(0, {str(ROOT)!r})",
            *imports,
            "import yaml",
            "from wsss.config import run_config, run_names, validate_config",
            f"cfg = validate_config(yaml.safe_load(open({str(ROOT / 'config.yaml')!r})), extra_checks=False)",
            "runs = {r: run_config(cfg, r, extra_checks=False) for r in run_names(cfg)}",
            "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('torch', 'torchvision')))",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", f"the Snakefile side imports torch: {proc.stdout[-2000:]}"


def test_dry_run_imports_no_torch(tmp_path):
    """``snakemake -n`` of the default config with torch hidden from the snakemake process: the DAG
    is built, and the torch checks ran in a child whose answer is kept for the next run."""
    code = _NO_TORCH + "\nfrom snakemake.cli import main\n\nmain(sys.argv[1:])\n"
    cmd = [sys.executable, "-c", code, "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "-n"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "torch asked for: []" in proc.stderr, out[-3000:]
    assert "train_classifier" in proc.stdout
    assert len(list((tmp_path / ".snakemake" / "wsss").glob("config-*.json"))) == 1


def test_config_checks_run_in_a_child_and_are_kept(tmp_path):
    """:func:`checked_config`: a config error found by the torch checks (an unknown method) is raised
    with its key, and is not kept; a kept answer is read without starting a child."""
    from wsss.config import ConfigError, validate_config
    from wsss.workflow.config_check import cache_key, checked_config

    cfg = validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()), extra_checks=False)
    bad = validate_config({**cfg, "classifier": {**cfg["classifier"], "method": "nope"}}, extra_checks=False)
    with pytest.raises(ConfigError, match="config key 'classifier.method'"):
        checked_config(bad, tmp_path)
    assert not list(tmp_path.iterdir())

    nowhere = str(tmp_path / "no-python")  # a kept answer: the child's interpreter is never started
    (tmp_path / f"config-{cache_key(cfg, nowhere)}.json").write_text(json.dumps({"classifier_inputs": {"x/s0": []}}))
    assert checked_config(cfg, tmp_path, python=nowhere) == {"classifier_inputs": {"x/s0": []}}
    with pytest.raises(OSError):  # another config: the child is needed
        checked_config({**cfg, "seeds": [1]}, tmp_path, python=nowhere)
