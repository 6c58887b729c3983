"""One-way layers: vlm.data and vlm.models never import each other (what both need is in vlm.common), and no
module of vlm imports one that imports it back at module level.

Read from the source with `ast`, so an import anywhere counts: at module level, inside a function or a class,
``import a.b`` as well as ``from a import b`` and relative imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
         for p in sorted((ROOT / "vlm").rglob("*.py"))}


def imported(name: str, top_level: bool = False) -> list[tuple[str, int]]:
    """(module, line) of each import in module ``name``: only its module-level statements with ``top_level``.
    ``from a import b`` names ``a.b`` where that is a module of vlm, else ``a``."""
    path = FILES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            out += [(f"{base}.{a.name}" if f"{base}.{a.name}" in FILES else base, node.lineno) for a in node.names]
    return out


def crossings(layer: str, other: str) -> list[str]:
    return [f"{FILES[name].relative_to(ROOT)}:{line} imports {module}"
            for name in FILES if name == layer or name.startswith(layer + ".")
            for module, line in imported(name) if module == other or module.startswith(other + ".")]


def test_the_files_are_read():
    assert {"vlm.data.collate", "vlm.models.vilt", "vlm.common", "vlm.models"} <= set(FILES)
    assert "vlm.data.sample" in {m for m, _ in imported("vlm.data.collate", top_level=True)}


def test_data_does_not_import_models():
    assert crossings("vlm.data", "vlm.models") == []


def test_models_do_not_import_data():
    assert crossings("vlm.models", "vlm.data") == []


def test_the_common_module_imports_no_layer():
    assert [m for m, _ in imported("vlm.common") if m.startswith("vlm")] == []


def cycles(graph: dict[str, list[str]]) -> list[str]:
    """The import cycles a depth-first search meets in ``graph`` (module -> the modules it imports)."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    found = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for nxt in graph[name]:
            if state.get(nxt) == "open":
                found.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    return found


def test_the_search_finds_a_cycle():
    assert cycles({"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": []}) == ["a -> b -> c -> a"]
    assert cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []


def test_no_import_cycle_at_module_level():
    def resolve(module: str) -> str | None:  # ``import vlm.x.y`` of a name that is not a module: its module
        while module and module not in FILES:
            module = module.rpartition(".")[0]
        return module or None

    graph = {name: sorted({resolve(m) for m, _ in imported(name, top_level=True) if m.startswith("vlm")} - {name, None})
             for name in FILES}
    assert graph["vlm.train"]  # the graph is read at all
    assert cycles(graph) == []
