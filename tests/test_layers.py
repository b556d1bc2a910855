"""The package's plan: every import of ``python/adaptdiff`` (deferred ones inside functions
included) goes down the layers, never up, and no modules import each other in a circle.

Layers, bottom to top (README.md, "Layout"): the native loader, ops, the layers built on ops
(nn, metrics, data), models, samplers and adapters, accel and train, recipes, the programs built on
recipes (studies, demos, bench), the command line. A package may import its own modules and any
package of a lower layer or of its own layer (a circle is caught separately).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "adaptdiff"

LAYERS = [
    {"_loader", "_schema", "_build_info", "_C", "_pyplot"},
    {"ops"},
    {"nn", "metrics", "data", "info"},
    {"models"},
    {"samplers", "adapters"},
    {"accel", "train"},
    {"recipes"},
    {"studies", "demo", "lm_demo", "bench", "adapt"},
    {"cli"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["adaptdiff", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The adaptdiff modules one ``from X import a, b`` statement loads."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not source.startswith("adaptdiff"):
        return []
    found = []
    for alias in node.names:  # `from pkg import submodule` loads the submodule
        sub = f"{source}.{alias.name}"
        found.append(sub if sub in MODULES else source)
    return found


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        targets = set()
        for node in ast.walk(tree):
            if _in_type_checking(node, parents):
                continue
            if isinstance(node, ast.ImportFrom):
                targets.update(_resolve(module, path.name == "__init__.py", node))
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("adaptdiff"))
        graph[module] = {t for t in targets if t != module and t in MODULES}
    return graph


GRAPH = _imports()


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "adaptdiff"


def test_every_top_level_name_has_a_layer():
    tops = {_top(m) for m in MODULES} - {"adaptdiff"}
    assert tops <= set(LEVEL), f"place these in LAYERS: {sorted(tops - set(LEVEL))}"


def test_no_import_goes_up_a_layer():
    upward = []
    for module, targets in GRAPH.items():
        here = _top(module)
        if here == "adaptdiff":  # the package face re-exports the loader and ops
            continue
        for target in targets:
            there = _top(target)
            if there != here and there != "adaptdiff" and LEVEL[there] > LEVEL[here]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports up the layers:\n" + "\n".join(sorted(upward))


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        packages.setdefault(_top(module), set()).update(
            _top(t) for t in targets if _top(t) != _top(module)
        )
    packages.pop("adaptdiff", None)
    assert not _circles(packages)


def test_no_import_circle_between_modules():
    # a package's __init__ importing its own modules is the usual face, not a circle
    graph = {
        m: {t for t in ts if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")}
        for m, ts in GRAPH.items()
    }
    assert not _circles(graph)


@pytest.mark.parametrize(
    ("graph", "circles"),
    [({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]), ({"a": {"b"}, "b": set()}, [])],
)
def test_the_circle_finder_finds_circles(graph, circles):
    assert _circles(graph) == circles
