"""The core's imports run one way (DESIGN.md, "Layers"): no circles, and nothing from the layers above.

Imports are read from the source with `ast`, all of them: at the top, inside functions and under
TYPE_CHECKING, since a circle hidden in any of those is still a circle in the design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "edge_qwen"
ABOVE_THE_CORE = ("edge_qwen.export", "edge_qwen.quant", "edge_qwen.apps", "edge_qwen.hub")


def imported_modules(source: str, package: str = "edge_qwen") -> Iterator[str]:
    """Every edge_qwen module a source imports; `from edge_qwen import x` counts as edge_qwen.x."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith(package))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == package:
                yield from (f"{package}.{alias.name}" for alias in node.names)
            elif node.module.startswith(f"{package}."):
                yield node.module


def core_graph(core: Path = CORE) -> dict[str, set[str]]:
    """edge_qwen.<module> -> the edge_qwen modules it imports, for each edge_qwen/*.py but __init__.

    The package's __init__ is left out: Python runs it before any submodule, so its (lazy) imports of
    them make no circle.
    """
    return {
        f"edge_qwen.{path.stem}": set(imported_modules(path.read_text()))
        for path in sorted(core.glob("*.py"))
        if path.stem != "__init__"
    }


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import circle of the graph's nodes, as [a, b, ..., a], or None when it is acyclic."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done or node not in graph:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def upward_imports(graph: Mapping[str, set[str]]) -> list[str]:
    """`module -> target` for each import of a layer above the core."""
    return [
        f"{module} -> {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if target.startswith(ABOVE_THE_CORE)
    ]


def test_the_core_has_no_import_circle() -> None:
    graph = core_graph()
    assert {"edge_qwen.engine", "edge_qwen.model", "edge_qwen.generation"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_core_imports_nothing_above_it() -> None:
    assert upward_imports(core_graph()) == []


def test_generation_and_chat_sit_on_the_engine() -> None:
    graph = core_graph()
    assert "edge_qwen.engine" in graph["edge_qwen.generation"]
    assert "edge_qwen.engine" in graph["edge_qwen.session"]
    assert not graph["edge_qwen.engine"] & {"edge_qwen.model", "edge_qwen.generation", "edge_qwen.session"}


@pytest.mark.parametrize(
    ("where", "line"),
    [  # a module-level import, one under TYPE_CHECKING, one inside a function
        ("top", "from edge_qwen.model import Model\n"),
        ("type_checking", "import typing\n\nif typing.TYPE_CHECKING:\n    from edge_qwen import model\n"),
        ("function", "def f():\n    import edge_qwen.model\n"),
    ],
)
def test_a_circle_is_found_wherever_its_import_is(tmp_path: Path, where: str, line: str) -> None:
    (tmp_path / "model.py").write_text("from edge_qwen.engine import Engine\n")
    (tmp_path / "engine.py").write_text(f'"""{where}"""\n{line}')
    (tmp_path / "sampling.py").write_text("import numpy\n")
    graph = core_graph(tmp_path)
    assert find_cycle(graph) == ["edge_qwen.engine", "edge_qwen.model", "edge_qwen.engine"]
    (tmp_path / "engine.py").write_text("from edge_qwen.sampling import Sampler\n")
    assert find_cycle(core_graph(tmp_path)) is None


def test_an_import_of_an_upper_layer_is_found(tmp_path: Path) -> None:
    (tmp_path / "package.py").write_text("def f():\n    from edge_qwen.hub import catalog\n")
    (tmp_path / "cache.py").write_text("from edge_qwen import export\n")
    assert upward_imports(core_graph(tmp_path)) == [
        "edge_qwen.cache -> edge_qwen.export",
        "edge_qwen.package -> edge_qwen.hub",
    ]
