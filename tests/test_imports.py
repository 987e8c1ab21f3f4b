"""The package's import graph: no circles, and the layering rules of docs/architecture.md.

Every import counts: at the top of a module, inside a function (a deferred import hides a
circle, it does not remove it) and under ``TYPE_CHECKING``. Read from the source with
:mod:`ast`; nothing is imported.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parent.parent / "src"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "fedlora").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """fedlora module -> the fedlora modules it imports (a package counts as its ``__init__``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
        resolved = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                resolved.add(target)
        graph[name] = resolved
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_deferred_and_type_checking_imports() -> None:
    graph = import_graph()
    # a function-local import (experiment imports simulation inside run_experiment)
    assert "fedlora.simulation" in graph["fedlora.experiment"]
    # a package importing its own submodule
    assert "fedlora.data.load" in graph["fedlora.data"]
    assert len(graph) > 50


def test_no_import_circles() -> None:
    assert cycles(import_graph()) == []


def test_layering() -> None:
    graph = import_graph()
    for name, targets in graph.items():
        assert "fedlora.cli" not in targets, f"{name} imports the CLI; import fedlora.experiment instead"
        if name.startswith("fedlora.algorithms"):
            runtime = {"fedlora.simulation", "fedlora.experiment", "fedlora.flower", "fedlora.report"}
            assert not targets & runtime, f"{name} imports {sorted(targets & runtime)}"


def test_algorithms_do_not_draw_and_report_leaves_the_backend_alone() -> None:
    """Algorithm files return ``structure`` and import no matplotlib; importing the reports
    (as a notebook does) chooses no backend: no pyplot, which would fix one at import."""
    for name in _modules():
        if name.startswith("fedlora.algorithms"):
            text = _modules()[name].read_text(encoding="utf-8")
            assert "matplotlib" not in text, f"{name} draws; return the data in structure() and draw in report.py"
    code = (
        "import sys, fedlora.report, fedlora.algorithms\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}
    )
    assert done.stdout.strip() == "ok", done.stderr
