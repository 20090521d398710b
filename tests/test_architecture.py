"""The shape of the code: layers that depend one way, no import cycle, small modules, names that say one thing.

The layer order itself is the import-linter contract in pyproject.toml (``lint-imports`` runs in
``make test``); these tests check what that contract does not: cycles between single modules
(imports inside functions included), module sizes, and that ``import slimkit`` reaches every
technique family without pulling in a heavy optional dependency.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import slimkit

PACKAGE = Path(slimkit.__file__).parent
#: Optional dependencies too heavy to import before they are used.
HEAVY = ("transformers", "onnxruntime", "onnx", "optuna", "torch_pruning", "matplotlib", "sklearn", "scipy",
         "psycopg", "mlxtend", "gensim")
MAX_LINES = 400
#: The same file name in several packages, allowed where it is the same idea at the same layer.
SAME_IDEA = {
    "__init__.py": "a package",
    "modules.py": "the stored layer classes of a technique family (quantize, factorize)",
    "record.py": "the typed step records of a technique family (core's base, quantize, prune)",
}


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules if m.startswith("slimkit")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_module_import_cycle_even_through_imports_inside_functions():
    graph = grimp.build_graph("slimkit", exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_a_package_does_not_import_the_top_level_package_it_sits_in():
    graph = grimp.build_graph("slimkit", exclude_type_checking_imports=True)
    importers = graph.find_modules_that_directly_import("slimkit")
    assert importers == set()  # slimkit/__init__.py is the top: nothing inside reaches back up to it


def test_every_module_is_under_the_size_limit():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_one_name_one_idea():
    by_name = collections.defaultdict(list)
    for p in PACKAGE.rglob("*.py"):
        by_name[p.name].append(str(p.parent.relative_to(PACKAGE)))
    clashes = {name: dirs for name, dirs in by_name.items() if len(dirs) > 1 and name not in SAME_IDEA}
    assert clashes == {}
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.rglob("*.py")}
    assert packages & (modules - {"__init__"}) == set()  # no module named like a package (a second "search")


def test_import_slimkit_reaches_every_family_without_heavy_dependencies():
    code = ("import json, sys; import slimkit as sk; "
            "names = [sk.prune.Channels, sk.prune.Gradual, sk.prune.Lottery, sk.factorize.Tucker, sk.quantize.QAT, "
            "sk.quantize.Mixed, sk.distill.Distill, sk.distill.Student, sk.architecture.Fuse, "
            "sk.architecture.EarlyExitConfig, sk.nas.CNN, sk.train.Finetune]; "
            f"print(json.dumps([[n.type_name for n in names], sorted(m for m in {HEAVY!r} if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    types, heavy = json.loads(out.stdout)
    assert types == ["prune.Channels", "prune.Gradual", "prune.Lottery", "factorize.Tucker", "quantize.QAT",
                     "quantize.Mixed", "distill.Distill", "distill.Student", "architecture.Fuse",
                     "architecture.EarlyExit", "nas.CNN", "train.Finetune"]
    assert heavy == []


@pytest.mark.parametrize("module", ["slimkit.core.registry", "slimkit.runtime"])
def test_importing_a_low_layer_first_still_registers_every_technique(module):
    code = (f"import importlib; importlib.import_module({module!r}); "
            "from slimkit.core.registry import all_techniques; print(sorted(t.name for t in all_techniques()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    built_in = sorted(t.name for t in slimkit.core.registry.all_techniques() if t.config.__module__.startswith("slimkit."))
    assert out.stdout.strip() == str(built_in)
