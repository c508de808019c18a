"""Layers import one way (core <- ir <- ops/norms <- bounds <- analyze <- report <- render/cli), with no
import cycle inside lipgraph. Read from the source with ``ast`` (module-level and function-level imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PKG = Path(__file__).parents[1] / "lipgraph"

#: module (dotted, relative to lipgraph) -> layer; higher layers may import lower ones, never the reverse.
LAYERS = {
    "core": 0, "errors": 0, "domains": 0,
    "ir": 1,
    "ops": 2, "norms": 2,
    # the frontends translate into the op table's canonical kinds and check the IR by running it
    "frontends": 3,
    "bounds": 4,
    # the result types analyze returns (with their JSON and text); they read the combinator for sub-DAG queries
    "report": 5,
    "api": 6, "penalty": 6,
    "render": 7, "cli": 7, "certify": 7, "__main__": 7, "__init__": 8,
}

#: deliberate upward imports, each with its reason (checked to exist, so the list cannot go stale)
ALLOWED_UP: set[tuple[str, str]] = set()

#: import cycles between modules (none)
ALLOWED_CYCLES: list[set[str]] = []


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    mod = _module_name(path).split(".")
    package = mod if path.name == "__init__.py" else mod[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [target] if node.module else [".".join([*base, a.name]) for a in node.names]
                out.update(n for n in names if n)
            elif node.module and node.module.startswith("lipgraph."):
                out.add(node.module[len("lipgraph."):])
        elif isinstance(node, ast.Import):
            out.update(a.name[len("lipgraph."):] for a in node.names if a.name.startswith("lipgraph."))
    return out


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in PKG.rglob("*.py"):
        src = _module_name(path)
        g.add_node(src)
        for dst in _imports(path):
            g.add_edge(src, dst)
    return g


def _layer(mod: str) -> int:
    top = mod.split(".")[0] or "__init__"
    return LAYERS[top]


def test_every_module_has_a_layer() -> None:
    missing = sorted({m.split(".")[0] for m in _graph() if m.split(".")[0] not in LAYERS})
    assert not missing, f"add these lipgraph modules to LAYERS in tests/test_layers.py: {missing}"


def test_no_upward_imports() -> None:
    bad = []
    used = set()
    for src, dst in _graph().edges:
        if _layer(dst) > _layer(src):
            key = (src.split(".")[0], dst.split(".")[0])
            if key in ALLOWED_UP:
                used.add(key)
            else:
                bad.append(f"{src} -> {dst}")
    assert not bad, "imports from a lower layer to a higher one: " + "; ".join(sorted(bad))
    assert used == ALLOWED_UP, f"stale exceptions in ALLOWED_UP: {ALLOWED_UP - used}"


def test_no_import_cycles() -> None:
    g = _graph()
    # a package's __init__ re-exporting its own submodules is not a cycle between concerns
    g.remove_edges_from([(s, d) for s, d in list(g.edges) if d.startswith(s + ".") or s == d])
    cycles = [c for c in nx.simple_cycles(g) if set(c) not in ALLOWED_CYCLES]
    assert not cycles, f"import cycles inside lipgraph: {cycles[:5]}"


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The checks can fail: a synthetic cycle and an upward edge are found."""
    g = nx.DiGraph([("a", "b"), ("b", "a")])
    assert list(nx.simple_cycles(g))
    assert _layer("render") > _layer("core")
