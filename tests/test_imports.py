"""The package's import structure: every module imports on its own, the import graph has no cycle,
and no module imports another module's private (``_name``) helpers.

The graph is read from the source with :mod:`ast`: an edge ``a -> b`` for every ``import`` /
``from ... import`` in ``a`` that names ``wsss`` module ``b`` (relative imports resolved;
``from pkg import sub`` is an edge to the submodule ``pkg.sub`` when there is one). Module-level
imports (those that run when the module is imported: top level, ``if``/``try`` blocks, class
bodies) must form no cycle; imports inside functions (lazy imports) must not close one either, so
that shared code lives in one module that the others import instead of two modules reaching into
each other.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wsss"


def _modules() -> Dict[str, Tuple[Path, bool]]:
    """``{dotted name: (file, is package)}`` for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module name a ``from ... import`` names (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _import_nodes(tree: ast.Module, functions: bool) -> Iterator[ast.stmt]:
    """Import statements of a module; without ``functions`` only those run at import time."""
    stack: List[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not functions:
            continue
        else:
            stack.extend(ast.iter_child_nodes(node))


def _imports(module: str, functions: bool) -> Iterator[Tuple[int, str, List[str]]]:
    """``(line, target module, imported names)`` of each import of a ``wsss`` module in ``module``."""
    path, is_pkg = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in _import_nodes(tree, functions):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "wsss" or alias.name.startswith("wsss."):
                    yield node.lineno, alias.name, []
        else:
            target = _resolve(module, is_pkg, node)
            if target == "wsss" or target.startswith("wsss."):
                yield node.lineno, target, [a.name for a in node.names]


def import_graph(functions: bool) -> Dict[str, Set[str]]:
    """``{module: modules it imports}`` within the package."""
    graph: Dict[str, Set[str]] = {}
    for module in MODULES:
        edges = set()
        for _, target, names in _imports(module, functions):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            edges.update(subs)
            if len(subs) < len(names) or not names:  # names that are not submodules come from ``target`` itself
                edges.add(target)
        graph[module] = {e for e in edges if e in MODULES and e != module}
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[Tuple[List[str], List[str]]]:
    """``(cycle, component)`` per strongly connected component of more than one module: a shortest
    cycle ``[a, b, ..., a]`` through its first module and all the component's modules."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[Set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for comp in components:  # a shortest path back to the start, inside the component
        start = min(comp)
        prev = {start: None}
        queue = [start]
        end = None
        while queue and end is None:
            v = queue.pop(0)
            for w in sorted(graph[v] & comp):
                if w == start:
                    end = v
                    break
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
        path = [start]
        v = end
        while v is not None and v != start:
            path.insert(1, v)
            v = prev[v]
        cycles.append((path + [start], sorted(comp)))
    return sorted(cycles)


def _format(cycles: List[Tuple[List[str], List[str]]]) -> str:
    return "\n".join(
        " -> ".join(cycle) + (f" (component: {', '.join(comp)})" if len(comp) > len(cycle) - 1 else "")
        for cycle, comp in cycles
    )


def test_module_level_imports_have_no_cycle():
    cycles = find_cycles(import_graph(functions=False))
    assert not cycles, f"import cycles among module-level imports:\n{_format(cycles)}"


def test_imports_inside_functions_close_no_cycle():
    cycles = find_cycles(import_graph(functions=True))
    assert not cycles, (
        "import cycles when imports inside functions count too (move the shared code into the module "
        f"it belongs to):\n{_format(cycles)}"
    )


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports() -> List[str]:
    """``from <other wsss module> import _name`` and ``<wsss module alias>._name`` uses."""
    problems = []
    for module, (path, is_pkg) in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases: Dict[str, str] = {}  # local name -> wsss module it is bound to
        rel = path.relative_to(ROOT)
        for node in _import_nodes(tree, functions=True):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES and a.asname:
                        aliases[a.asname] = a.name
                continue
            target = _resolve(module, is_pkg, node)
            if target not in MODULES:
                continue
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
                elif _private(a.name) and target != module:
                    problems.append(f"{rel}:{node.lineno}: imports {a.name} from {target}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != module
            ):
                problems.append(f"{rel}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    return sorted(problems)


def test_no_module_imports_private_helpers_of_another():
    problems = private_imports()
    assert not problems, "private helpers used across modules (make them public where they belong):\n" + "\n".join(
        problems
    )


def test_graph_helpers_find_a_cycle_and_a_private_import():
    """The checks above can fail: made-up graphs with cycles are reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [(["a", "b", "c", "a"], ["a", "b", "c"])]
    assert find_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"b"}}) == [(["a", "b", "a"], ["a", "b", "c"])]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert _private("_x") and not _private("__version__") and not _private("x")


_IMPORT_EACH = r"""
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for m in [m for m in sys.modules if m == "wsss" or m.startswith("wsss.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""


def test_every_module_imports_first():
    """Each module imports as the first ``wsss`` module of a process (one subprocess; ``wsss``
    is dropped from ``sys.modules`` before each, third-party packages stay loaded). ``__main__``
    modules are left out: importing one runs the command line."""
    names = sorted(m for m in MODULES if not m.endswith(".__main__"))
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], cwd=ROOT, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "modules that fail to import on their own:\n" + "\n".join(
        f"{k}:\n{v}" for k, v in failed.items()
    )
