"""No module of vlm/ imports a module that imports it back, at module level or inside a function."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The vlm modules ``path`` imports anywhere in it (``from a.b import c`` names a.b.c when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in modules else node.module)
    return {m for m in out if m in modules}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / "vlm").rglob("*.py")}
    return {name: imports(path, set(files)) - {name} for name, path in files.items()}


def test_no_module_imports_one_that_imports_it_back():
    g = graph()
    assert g["vlm.train"] and g["vlm.tasks.base"]  # the graph is read at all
    cycles = []

    def visit(node, path, on_path):
        for nxt in sorted(g[node]):
            if nxt in on_path:
                cycle = path[path.index(nxt):] + [nxt]
                if min(cycle[:-1]) == cycle[0]:  # each cycle once, from its smallest module
                    cycles.append(" -> ".join(cycle))
            elif nxt not in done:
                visit(nxt, path + [nxt], on_path | {nxt})
        done.add(node)

    done: set[str] = set()
    for start in sorted(g):
        if start not in done:
            visit(start, [start], {start})
    assert not cycles, cycles
