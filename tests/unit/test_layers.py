"""Imports point down the layers: record/ never imports the SDK, CLI or engines."""

import ast
from pathlib import Path

import kiln

SRC = Path(kiln.__file__).parent
FORBIDDEN = {
    "record": (
        "kiln.app",
        "kiln.cli",
        "kiln.compute",
        "kiln.registry",
        "kiln.serve",
        "kiln.observe",
    ),
    "compute": (
        "kiln.app",
        "kiln.cli",
        "kiln.registry",
        "kiln.serve",
        "kiln.function",
        "kiln.record",
        "kiln._engine",
        "kiln._runner",
    ),
    "registry": ("kiln.app", "kiln.cli", "kiln.compute", "kiln.serve", "kiln.function"),
    "observe": ("kiln.app", "kiln.cli", "kiln.compute", "kiln.serve", "kiln.function"),
    "serve": ("kiln.cli",),
    "config.py": ("kiln.record", "kiln.app", "kiln.cli"),
    "errors.py": ("kiln.",),
}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_lower_layers_do_not_import_upper_ones() -> None:
    checked = 0
    for part, banned in FORBIDDEN.items():
        target = SRC / part
        files = target.rglob("*.py") if target.is_dir() else [target]
        for f in files:
            checked += 1
            bad = [m for m in imports_of(f) if m.startswith(banned)]
            assert not bad, f"{f.relative_to(SRC)} imports {bad}"
    assert checked > 5
