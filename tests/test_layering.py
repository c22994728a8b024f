"""The package's import structure, read from the source (AST), as the architecture brief
states it: no import circles, no function-level imports of strata modules (a late import
hides a circle), and no import from a lower floor to a higher one.

Floors, lowest first (a module may import its own floor and those below)::

    csi.errors, csi.ids                      values and exceptions
    csi.host                                 kernel primitives
    csi.graphdriver, csi.state, csi.kube     the layered drivers / the CSI records / the API client
    csi.backup                               OCI artifacts (through the driver contract)
    csi.services, csi.peers                  gRPC services and node-to-node calls
    csi.ops, csi.bench, csi.demo, csi.cli    commands

Generated protobuf code is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "csi"

FLOORS: list[tuple[str, ...]] = [
    ("csi", "csi.errors", "csi.ids"),
    ("csi.host",),
    ("csi.graphdriver", "csi.state", "csi.kube", "csi.proto"),
    ("csi.backup",),
    ("csi.services", "csi.peers"),
    ("csi.ops", "csi.bench", "csi.demo", "csi.cli"),
]
# within a floor, packages that must not import each other
APART = [("csi.graphdriver", "csi.state"), ("csi.graphdriver", "csi.kube"), ("csi.state", "csi.kube")]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        if "_pb2" in path.name:
            continue
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported csi module, line, at module level) for every import of a csi module."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    top = {id(n) for n in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks count as module level
        if isinstance(node, ast.If):
            top |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t.startswith("csi") and t != name and t:
                found.append((t, node.lineno, id(node) in top))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _floor(name: str) -> int:
    best, level = -1, 0
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    return level


def test_modules_found() -> None:
    assert "csi.graphdriver.driver" in MODULES and "csi.services.server" in MODULES


def test_no_late_imports() -> None:
    late = [f"{m}:{line} -> {t}" for m, edges in GRAPH.items() for t, line, top in edges if not top]
    assert not late, "function-level imports of strata modules (they hide circles):\n" + "\n".join(late)


def test_no_import_circles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in GRAPH[v]:
            if w not in GRAPH or w == v or _is_parent_package(v, w):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def _is_parent_package(module: str, target: str) -> bool:
    """``import csi.x.y`` executes ``csi/x/__init__``: a package's own __init__ is no edge."""
    return module.startswith(target + ".")


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_runs_up_a_floor(module: str) -> None:
    mine = _floor(module)
    up = [f"{t} (line {line})" for t, line, _ in GRAPH[module]
          if _floor(t) > mine and not _is_parent_package(module, t)]
    assert not up, f"{module} (floor {mine}) imports a higher floor: {', '.join(up)}"
    for a, b in APART:
        for x, y in ((a, b), (b, a)):
            if module == x or module.startswith(x + "."):
                bad = [t for t, _, _ in GRAPH[module] if t == y or t.startswith(y + ".")]
                assert not bad, f"{module} imports {bad}: {x} and {y} stand apart"
