"""No module of the data layer, the config checks or the errors imports another module's private names (a leading
underscore): what several modules share is public where it is defined."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCOPE = [ROOT / "vlm" / "data", ROOT / "vlm" / "config.py", ROOT / "vlm" / "errors.py", ROOT / "vlm" / "bench" / "fixtures.py"]


def private_imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {node.module}")
    return out


def test_no_private_name_is_imported_across_modules():
    files = [p for s in SCOPE for p in (sorted(s.rglob("*.py")) if s.is_dir() else [s])]
    assert len(files) > 10  # the layer is read at all
    assert [line for path in files for line in private_imports(path)] == []
