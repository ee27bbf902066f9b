"""The package's shape: small modules, no import cycles, protocols free of I/O.

Read with ``ast`` only: nothing of ``wsgi_hijack`` is imported here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wsgi_hijack"
MAX_LINES = 500
#: What a protocol (bytes in, bytes out) must not import: it does no I/O.
PROTOCOLS_MAY_NOT = ("gevent", "socket", "select", "wsgi_hijack.reactor")
#: Modules over MAX_LINES that are being split on the main branch.


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in _files()}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _owner(name: str) -> str | None:
    """The module of ours that importing ``name`` runs last: ``name`` itself,
    or the innermost of ours that contains it; None when it is not ours."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _base(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(module: str) -> list[tuple[str, int]]:
    """Every module ``module`` imports (at the top or inside a function), with
    the line: ``from pkg import name`` is ``pkg.name`` if that is a module,
    else ``pkg`` (a package: its ``__init__``). Outside modules keep their
    full dotted name."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module of ours it imports: line of the first such import}.

    An import of ``pkg.sub`` also runs ``pkg/__init__``; that implicit edge
    is left out (a submodule importing its sibling is not a cycle with the
    package that imports both), but every explicit edge stays, those from a
    package's ``__init__`` to its submodules included: a cycle through an
    ``__init__`` is a cycle.
    """
    graph: dict[str, dict[str, int]] = {}
    for module in MODULES:
        edges = graph.setdefault(module, {})
        for name, line in imports(module):
            target = _owner(name)
            if target is not None and target != module:
                edges.setdefault(target, line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    members = set(component)
    edges = [f"  {a} -> {b} ({MODULES[a].relative_to(ROOT)}:{line})"
             for a in component for b, line in sorted(graph[a].items()) if b in members]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(edges)


@pytest.mark.parametrize("path", _files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_module_at_most_500_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, (f"{path.relative_to(ROOT)} has {lines} lines (at most "
                                f"{MAX_LINES}): split it by responsibility")


def test_graph_resolves_imports() -> None:
    # The resolution the cycle test relies on, on imports whose shape is known.
    graph = import_graph()
    assert "wsgi_hijack.demo_publish" in graph["wsgi_hijack.demo"]  # from .x import name
    assert "wsgi_hijack.config" in graph["wsgi_hijack.workers.checks"]  # from .. import x
    assert "wsgi_hijack.reactor" in graph["wsgi_hijack.workers.ggevent"]  # into a package
    assert "wsgi_hijack.metrics" in graph["wsgi_hijack.demo"]  # inside a function
    assert "wsgi_hijack.loadclient_machine" in graph["wsgi_hijack.loadclient"]


def test_demo_modules_import_one_way() -> None:
    graph = import_graph()
    assert "wsgi_hijack.demo_ws" in graph["wsgi_hijack.demo"]
    assert "wsgi_hijack.demo" not in graph["wsgi_hijack.demo_ws"]


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycles = strongly_connected(graph)
    assert not cycles, "\n".join(_describe(c, graph) for c in cycles)


def test_protocols_do_no_io() -> None:
    found = []
    for module in sorted(MODULES):
        if module != "wsgi_hijack.protocols" and not module.startswith("wsgi_hijack.protocols."):
            continue
        for name, line in imports(module):
            for banned in PROTOCOLS_MAY_NOT:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {name}")
    assert not found, "protocols/ must not do I/O nor reach the reactor:\n" + "\n".join(found)
