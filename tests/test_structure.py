"""The package's shape: imports inside gptlab/ run one way.

Every import counts, at module level or inside a function. A function-level import
only defers a cycle to the first call; it does not remove it (the cycle this test was
written against, validate -> model -> validate, was hidden that way). Imports under
`if TYPE_CHECKING:` would be exempt, as they never run; there are none.
"""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "gptlab"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    base = current.split(".") if is_package else current.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    # `from .data import prepare` imports the module gptlab.data.prepare
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", node)
            else:
                continue
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
    return found


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "gptlab"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .data.c import y\n")
    (pkg / "data" / "c.py").write_text("from .. import a\n")
    (pkg / "d.py").write_text("import gptlab.a\n")
    graph = import_graph(pkg)
    assert graph["gptlab.d"] == {"gptlab.a"}
    assert cycles(graph) == [["gptlab.a", "gptlab.b", "gptlab.data.c"]]


def test_no_import_cycle_inside_gptlab():
    graph = import_graph()
    assert "gptlab.errors" in graph and not graph["gptlab.errors"], "errors.py must stay a leaf"
    assert cycles(graph) == []
