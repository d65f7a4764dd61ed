"""The package structure (issue 14): no import circles anywhere, and each layer imports only
the layers below it. Imports are read with `ast`, function-local ones included (a circle
hidden inside a function is still a circle), so nothing is imported to check them.

    python tests/test_structure.py    # prints the layers, the graph's depth and its longest chain
"""
from __future__ import annotations

import ast
import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("data_pipeline", "models", "trainer", "lab")  # importable packages
SCRIPTS = ("launch", "benchmarks")  # folders of scripts: a module `x` there imports its neighbours as `x`

# What each layer may import (beyond itself and third-party code). Bottom to top: the data
# layer knows no models (so a data bug is never a model bug, and the cache job's readers need
# no torch model code), models are single-device torch code that knows no training, the
# trainer's core knows no job, the jobs know no lab, and nothing imports the scripts.
ALLOWED = {
    "data_pipeline": set(),
    "models": {"data_pipeline"},
    "trainer.core": {"data_pipeline", "models"},
    "trainer.cache": {"data_pipeline", "models", "trainer.core"},
    "trainer.autoencoder": {"data_pipeline", "models", "trainer.core"},
    "trainer.unet": {"data_pipeline", "models", "trainer.core", "trainer.cache"},
    "trainer.slurm": {"data_pipeline", "trainer.core", "trainer.cache", "trainer.autoencoder", "trainer.unet"},
    "lab": {"data_pipeline", "models", "trainer"},
    "launch": {"data_pipeline", "models", "trainer", "lab"},
    "benchmarks": {"data_pipeline", "models", "trainer", "lab"},
}


def project_modules() -> dict[str, str]:
    """Dotted module name -> file, for every Python file of the project."""
    out = {}
    for top in PACKAGES + SCRIPTS:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[dotted.removesuffix(".__init__")] = path
    return out


def _resolve(module: str, node: ast.AST, modules: dict[str, str]) -> list[str]:
    """The project modules one import statement of `module` imports."""
    package = module if modules[module].endswith("__init__.py") else module.rpartition(".")[0]
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names] + [base]
    found = []
    for name in names:
        if module.split(".")[0] in SCRIPTS and name.split(".")[0] not in PACKAGES:
            name = f"{module.split('.')[0]}.{name}"  # a script importing its neighbour (sys.path[0])
        # The deepest project module the name points at: `from trainer.core import dist` is
        # trainer.core.dist; `from trainer.core.dist import World` is trainer.core.dist.
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module and name not in found:
            found.append(name)
    if isinstance(node, ast.ImportFrom):  # `from pkg import sub` also names `pkg`: keep the deepest only
        found = [f for f in found if not any(g.startswith(f + ".") for g in found)]
    return found


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        graph[module] = {target for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for target in _resolve(module, node, modules)}
        # Empty package __init__ files are no edges; a package that re-exports would show here.
        graph[module] = {t for t in graph[module] if not (modules[t].endswith("__init__.py")
                                                          and os.path.getsize(modules[t]) == 0)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> str:
    for name in sorted(ALLOWED, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    raise AssertionError(f"{module} belongs to no layer: add its package to ALLOWED in tests/test_structure.py")


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    @functools.lru_cache(maxsize=None)
    def chain(v: str) -> tuple[str, ...]:
        best = max((chain(w) for w in graph[v]), key=len, default=())
        return (v,) + best

    return list(max((chain(v) for v in graph), key=len))


def test_the_import_graph_has_no_circles():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_each_layer_imports_only_the_layers_below_it():
    bad, modules = [], project_modules()
    for module, targets in import_graph().items():
        if not targets and modules[module].endswith("__init__.py"):
            continue  # an empty package marker
        mine = layer(module)
        for target in targets:
            theirs = layer(target)
            allowed = {mine} | ALLOWED[mine]
            if not any(theirs == a or theirs.startswith(a + ".") for a in allowed):
                bad.append(f"{module} imports {target} ({mine} may import {sorted(ALLOWED[mine]) or 'nothing'})")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself can fail: a circle through a function-local relative import is found."""
    pkg = tmp_path / "trainer"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from . import b\n")
    (pkg / "core" / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "core" / "c.py").write_text("from trainer.core.b import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    import_graph.cache_clear()
    try:
        graph = import_graph()
        assert graph["trainer.core.c"] == {"trainer.core.b"}
        assert cycles(graph) == [["trainer.core.a", "trainer.core.b"]]
    finally:
        import_graph.cache_clear()


def test_the_layout_map_names_every_package_and_module():
    """The map of the tree (docs/layout.md, which the README links) must not drift from it: every package
    folder and every module of trainer/ and lab/ is named in it, before its section on the tests."""
    import re

    with open(os.path.join(ROOT, "docs", "layout.md")) as f:
        layout = f.read()
    layout = layout[:layout.index("\n## ")]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", layout))
    missing = []
    for module, path in project_modules().items():
        top = module.split(".")[0]
        if top in ("trainer", "lab") and not path.endswith("__init__.py") and module.split(".")[-1] not in words:
            missing.append(module)
        if path.endswith("__init__.py") and f"{module.replace('.', '/')}/" not in layout:
            missing.append(module.replace(".", "/") + "/")
    assert not missing, f"docs/layout.md does not name: {', '.join(sorted(missing))}"


if __name__ == "__main__":
    g = import_graph()
    chain = longest_chain(g) if not cycles(g) else []
    print(f"{len(g)} modules, {sum(len(t) for t in g.values())} imports between them, circles: {cycles(g) or 'none'}")
    print(f"depth (longest import chain): {len(chain)} modules: {' -> '.join(chain)}")
