"""The package's import graph has no cycle: every module can be imported without its importers.

The graph is read from the source with `ast`, imports inside functions included (a deferred import
is still a dependency), so a cycle hidden behind a lazy import fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` under `src` (a package by its `__init__`)."""
    found = {}
    for path in (src / package).rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Each module of `package` -> the modules of `package` it imports anywhere in its file."""
    files = module_files(src, package)
    graph = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: climb from this module's package
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                # `from a.b import c` imports the module a.b.c when there is one, else a name of a.b
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_package_has_no_import_cycle():
    graph = import_graph(SRC, "vlmablate")
    assert len(graph) > 50 and "vlmablate.train.runner" in graph  # the whole package was read
    assert cycles(graph) == []


def test_the_lower_layer_of_each_former_cycle_does_not_import_the_upper():
    graph = import_graph(SRC, "vlmablate")
    # projector_io raises ConfigError from vlmablate.errors; config reads projector metadata through it.
    assert graph["vlmablate.model.projector_io"] == {"vlmablate.errors"}
    assert "vlmablate.model.projector_io" in graph["vlmablate.config"]
    # Stage chaining receives the runner it calls; the runner imports stage chaining.
    assert "vlmablate.train.runner" not in graph["vlmablate.train.stages"]
    assert "vlmablate.train.stages" in graph["vlmablate.train.runner"]
    assert graph["vlmablate.errors"] == set()


def test_a_cycle_through_a_deferred_or_relative_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from pkg.sub import high\n")  # deferred, inside a function
    (pkg / "sub" / "high.py").write_text("from ..low import f\nfrom pkg import low as again\n")  # relative
    (pkg / "leaf.py").write_text("import pkg.low\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.low"] == {"pkg.sub.high"} and graph["pkg.sub.high"] == {"pkg.low"}
    assert graph["pkg.leaf"] == {"pkg.low"}
    assert cycles(graph) == [["pkg.low", "pkg.sub.high"]]
